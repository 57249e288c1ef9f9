# nodulekit: two commands do all setup on a fresh machine.
#   make demo   - create .venv, install, run the whole pipeline on the synthetic dataset (runs/demo/)
#   make test   - create .venv (and .venv-rknn for the RKNN simulator tests), install Debian's chromium
#                 for the viewer's browser tests if it is missing, run the test suite (slow tests
#                 included, as CI does)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
QUICK ?= 0
DEMO_OUT := runs/demo
DEMO_ARGS := $(if $(filter 1,$(QUICK)),--quick,)
PYTEST_ARGS ?=

.PHONY: demo demo-rknn froc-independent froc-variants search weights seeds model-card test test-fast rknn venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# --no-compile: byte-compiling all 12,000 modules of the environment takes about a minute on 2
	# cores; Python compiles the few thousand that are imported on first use instead
	$(PY) -m pip install -q --no-compile -r requirements-dev.txt
	$(PY) -m pip install -q --no-compile --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nodulekit demo --out $(DEMO_OUT) $(DEMO_ARGS)

demo-rknn: rknn demo

# FROC on scans the demo never trained or chose anything on: a second synthetic draw (seed 1,
# INDEP_SCANS scans, about 3.6 nodules each) through the models the demo deployed, as its
# models/deployed.json lists them
DEPLOYED := $(DEMO_OUT)/models/deployed.json
INDEP := runs/independent
INDEP_SCANS ?= 30
# the draw is generated once, and again only when its size, seed or generator version differs
INDEP_DATA = $(PY) -c 'import json, sys; p = json.load(open(sys.argv[1]))["parameters"]; \
  from nodulekit.data.synth.scan import GENERATOR_VERSION as V; \
  sys.exit(p["n_scans"] != int(sys.argv[2]) or p["seed"] != 1 or p.get("version") != V)' \
  $(INDEP)/data/synth.json $(INDEP_SCANS) 2>/dev/null \
  || { rm -rf $(INDEP)/data && $(VENV)/bin/nodulekit synth --out $(INDEP)/data --scans $(INDEP_SCANS) --seed 1 --workers 2; }
froc-independent: $(STAMP)
	test -f $(DEPLOYED) || { echo "run make demo first ($(DEPLOYED) is missing)"; exit 1; }
	$(INDEP_DATA)
	$(VENV)/bin/nodulekit detect $(INDEP)/data/subset0 --out $(INDEP)/detect \
	  $$($(PY) -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["detect_args"]))' $(DEPLOYED))
	$(VENV)/bin/nodulekit evaluate --detections $(INDEP)/detect/nodules.csv \
	  --annotations $(INDEP)/data/annotations.csv --excluded $(INDEP)/data/annotations_excluded.csv \
	  --seriesuids $(INDEP)/data/seriesuids.csv --out $(INDEP)/evaluate

# every variant of the demo's compression study end to end (its deployed file in ONNX Runtime, the
# demo's deployed classifier) on the held-out scans and on the independent draw; CPM per variant
# into runs/demo/optimize/report.json and runs/demo/report/report.json, and their reports
froc-variants: $(STAMP)
	test -f $(DEPLOYED) || { echo "run make demo first ($(DEPLOYED) is missing)"; exit 1; }
	$(INDEP_DATA)
	$(VENV)/bin/nodulekit score $(DEMO_OUT)/optimize --also $(DEMO_OUT)/report \
	  --cls $$($(PY) -c 'import json, sys; print(json.load(open(sys.argv[1]))["cls"])' $(DEPLOYED)) \
	  --set held_out=$(DEMO_OUT)/data@$(DEMO_OUT)/split.json --set independent=$(INDEP)/data

# the compression search on the demo's model: per-block sensitivity, the widths that lose least
# within BUDGET KiB of NPU weight memory, and the uniform cut at the same budget, each fine-tuned,
# quantized and measured with the demo's study settings (and built for the NPU when .venv-rknn
# exists), then both pruned_qat files and the baseline scored end to end on the independent draw;
# SPEEDUP=3 also asks for a third of the baseline's work per slice (a CPU budget)
BUDGET ?= 29.6
SPEEDUP ?=
SEARCH := runs/search
search: $(STAMP)
	test -f $(DEMO_OUT)/models/seg.pt || { echo "run make demo first ($(DEMO_OUT)/models/seg.pt is missing)"; exit 1; }
	$(INDEP_DATA)
	$(VENV)/bin/nodulekit optimize --search --budget-kib $(BUDGET) $(if $(SPEEDUP),--min-speedup $(SPEEDUP),) \
	  --seg $(DEMO_OUT)/models/seg.pt \
	  --data $(DEMO_OUT)/data --split $(DEMO_OUT)/split.json --out $(SEARCH) --variants pruned pruned_ptq pruned_qat \
	  --finetune-epochs 3 --finetune-samples-per-epoch 8192 --qat-epochs 3 --samples-per-epoch 512 \
	  --calib-slices 32 --bench-runs 10 --no-openvino $(if $(wildcard .venv-rknn/.installed),--rknn,)
	$(VENV)/bin/nodulekit score $(SEARCH)/searched --variants baseline,pruned_qat \
	  --cls $$($(PY) -c 'import json, sys; print(json.load(open(sys.argv[1]))["cls"])' $(DEPLOYED)) \
	  --set independent=$(INDEP)/data
	$(VENV)/bin/nodulekit score $(SEARCH)/uniform --variants pruned_qat \
	  --cls $$($(PY) -c 'import json, sys; print(json.load(open(sys.argv[1]))["cls"])' $(DEPLOYED)) \
	  --set independent=$(INDEP)/data

# the release recipe: the demo's training on a larger synthetic draw (seed 100, 60 scans) for longer,
# scored on its held-out scans, installed into src/nodulekit/models/weights/ with a manifest of
# hashes, recipe, time and CPM (`nodulekit detect` uses them when --seg and --cls are not given)
weights: $(STAMP)
	$(VENV)/bin/nodulekit weights --out runs/weights

# training recipes judged by their mean CPM over SEEDS on the independent draw, every seed trained on
# the demo's draw (seed 0); RECIPES: NAME or NAME:field=value,... (`nodulekit seeds --help`), e.g.
# make seeds RECIPES="demo short:cls_epochs=6"; stages are cached under runs/seeds
SEEDS ?= 0 1 2
RECIPES ?= demo
seeds: $(STAMP)
	$(INDEP_DATA)
	$(VENV)/bin/nodulekit seeds $(INDEP)/data --seeds $(SEEDS) $(foreach r,$(RECIPES),--recipe $(r)) --out runs/seeds

# docs/model-card.md: the shipped weights on the independent draw and on the shared real scans
# (REAL: the folder of the CPTAC and LIDC-IDRI-0002 series), every mark above 0.5 listed and the 10
# most probable per series shown; the demo's recipe on the same draw too when `make froc-independent`
# has scored it
REAL ?= ../shared/data/real
CARD := runs/model-card
model-card: $(STAMP)
	$(INDEP_DATA)
	$(VENV)/bin/nodulekit detect $(INDEP)/data/subset0 --out $(CARD)/independent --no-png --no-progress
	$(VENV)/bin/nodulekit evaluate --detections $(CARD)/independent/nodules.csv \
	  --annotations $(INDEP)/data/annotations.csv --excluded $(INDEP)/data/annotations_excluded.csv \
	  --seriesuids $(INDEP)/data/seriesuids.csv --out $(CARD)/independent/evaluate
	$(VENV)/bin/nodulekit detect $(REAL)/CPTAC-LSCC_C3N-00247 $(REAL)/LIDC-IDRI-0002_dicom --out $(CARD)/real \
	  --no-progress
	$(PY) scripts/model_card.py --froc $(CARD)/independent/evaluate/froc.json --real $(CARD)/real/nodules.json \
	  $(if $(wildcard $(INDEP)/evaluate/froc.json),--demo-froc $(INDEP)/evaluate/froc.json,) \
	  $(if $(wildcard runs/seeds/seeds.json),--seeds runs/seeds/seeds.json,)

# two workers, a test file each at a time (its module fixtures are built once): most tests use one
# core, and the two longest ones (the quick demo, the README's commands) then run side by side
XDIST := -n 2 --dist loadfile
test: $(STAMP) rknn /usr/bin/chromium
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

# the viewer's browser tests drive Debian's chromium through Playwright (never a downloaded browser)
/usr/bin/chromium:
	apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

# rknn-toolkit2 pins clash with the main environment, so it lives in its own venv and
# nodulekit reaches it only through a subprocess.
rknn: .venv-rknn/.installed

.venv-rknn/.installed: requirements-rknn.txt
	test -x .venv-rknn/bin/python || $(PYTHON) -m venv .venv-rknn
	.venv-rknn/bin/pip install -q --no-deps rknn-toolkit2==2.5.0
	.venv-rknn/bin/pip install -q -r requirements-rknn.txt
	touch $@

clean:
	rm -rf runs .pytest_cache
