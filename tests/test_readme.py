"""Every command in the README works as written.

Each ``nodulekit ...`` line of the README's bash blocks must parse with the real CLI, and each
``make`` target it names must exist. The slow test then runs every one of them with the README's
placeholder paths replaced by real inputs (the synthetic dataset, the real DICOM and MetaImage
series, dlwpt-format checkpoints) and its sizes shrunk (epochs, steps), and checks what each wrote.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_commands() -> list[str]:
    """Command lines of the README's bash blocks (continuations joined, comments dropped)."""
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def nodulekit_argv(line: str) -> list[str] | None:
    """The arguments after ``nodulekit`` (also under ``torchrun ... -m nodulekit``), or None."""
    argv = shlex.split(line)
    if argv[0] == "nodulekit":
        return argv[1:]
    if argv[0] == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "nodulekit":
        return argv[argv.index("-m") + 2:]
    return None


def test_the_readme_has_the_two_commands_and_each_stage():
    cmds = readme_commands()
    assert "make demo" in cmds and "make test" in cmds
    names = {nodulekit_argv(c)[0] for c in cmds if nodulekit_argv(c)}
    assert {"train", "detect", "optimize", "export"} <= names


def test_every_readme_command_parses():
    from nodulekit.cli import build_parser

    checked = 0
    for line in readme_commands():
        argv = nodulekit_argv(line)
        if argv is None:
            continue
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command does not parse ({exc.code}): {line}")
        assert getattr(args, "func", None), line
        checked += 1
    assert checked >= 8


def test_the_readme_is_short():
    # a user's page, not a lab notebook: measurement history goes to docs/experiments.md
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


RESULTS = REPO / "docs" / "results" / "report.json"


def test_the_readme_results_table_is_the_rendering_of_the_committed_report():
    from nodulekit.report.readme import current_block, results_markdown
    from nodulekit.report.render import load_report

    if not RESULTS.is_file():
        pytest.skip(f"{RESULTS.relative_to(REPO)} is not committed yet: the README's results block "
                    "cannot be checked until a full demo's report.json is there")
    want = results_markdown(load_report(RESULTS)).strip()
    assert current_block(README.read_text(encoding="utf-8")) == want, (
        "README.md's results block is not what `nodulekit report docs/results --readme README.md` renders")


def _report(npu: bool) -> dict:
    row = dict(params=1, size_kib=1.0, precision=0.1, dice=0.2, artifact="x.onnx")
    report = {
        "baseline": "baseline", "machine": {"cpu": "Test CPU", "cores": 2}, "dataset": {},
        "variants": [
            {**row, "name": "baseline", "weight_memory_kib": 464.55, "latency_us": 112600.0, "recall": 0.771,
             "weight_memory_ratio": 1.0, "latency_ratio": 1.0, "recall_change_pts": 0.0},
            # ratios deliberately unlike what the figures would give: they must be read, not recomputed
            {**row, "name": "pruned_qat", "weight_memory_kib": 27.04, "latency_us": 85700.0, "recall": 0.795,
             "weight_memory_ratio": 17.18, "latency_ratio": 1.31, "recall_change_pts": 2.4},
            {"name": "qat", "error": "RuntimeError: boom"},
        ],
        "detection": {"cpm": 0.918, "cpm_ci": [0.905, 1.0], "n_scans": 3, "n_nodules": 7},
        "timings_s": {"synthetic_data": 57.0, "train_seg": 226.0, "detect": 147.4},
    }
    if npu:
        report["npu"] = [{"name": "baseline", "weight_memory_kib": 236.81, "recall": 0.765},
                         {"name": "pruned_qat", "weight_memory_kib": 37.31, "recall": 0.85}]
    return report


def test_the_results_renderer_gives_the_expected_rows():
    from nodulekit.report.readme import results_markdown

    lines = results_markdown(_report(npu=False)).splitlines()
    assert lines[0] == ("| variant | weight memory (KiB) | x smaller | CPU latency (ms) | x faster "
                        "| pixel recall (%) | change (pts) |")
    assert lines[2] == "| baseline | 464.55 | 1.00x | 112.6 | 1.00x | 77.1 | +0.0 |"
    assert lines[3] == "| pruned_qat | 27.04 | 17.18x | 85.7 | 1.31x | 79.5 | +2.4 |"
    assert lines[4].startswith("| qat | failed: RuntimeError: boom |")
    text = "\n".join(lines)
    assert "Held-out detection: FROC CPM **0.918** (95 % CI 0.905-1.000) on 3 scans with 7 nodules." in text
    assert "The demo took 7 min 10 s on Test CPU, 2 cores" in text
    report = _report(npu=False)
    report["timings_s"]["total"] = 500.0  # the demo's own total is read, not summed again
    report["demo"] = {"quick": True}
    assert "The quick demo took 8 min 20 s on Test CPU, 2 cores" in results_markdown(report)


def test_the_results_renderer_leads_with_end_to_end_cpm_when_the_variants_were_scored():
    from nodulekit.report.readme import results_markdown

    report = _report(npu=False)
    entry = {"n_scans": 10, "n_nodules": 38, "nodules_found": 30, "fps_per_scan": 18.7}
    report["variants"][0]["froc"] = {"held_out": {**entry, "cpm": 0.9, "cpm_change": 0.0},
                                     "independent": {**entry, "cpm": 0.594, "cpm_change": 0.0}}
    report["variants"][1]["froc"] = {"independent": {**entry, "cpm": 0.571, "cpm_change": -0.023}}
    lines = results_markdown(report).splitlines()
    assert lines[0].startswith("| variant | CPM (independent) | CPM change | weight memory (KiB) |")
    assert lines[2] == "| baseline | 0.594 | +0.000 | 464.55 | 1.00x | 112.6 | 1.00x | 77.1 | +0.0 |"
    assert lines[3] == "| pruned_qat | 0.571 | -0.023 | 27.04 | 17.18x | 85.7 | 1.31x | 79.5 | +2.4 |"
    assert lines[4].startswith("| qat | failed: RuntimeError: boom |") and lines[4].count("|") == lines[0].count("|")


def test_the_results_renderer_reads_the_cpu_table():
    from nodulekit.report.readme import results_markdown

    report = _report(npu=False)
    assert "CPU runtimes" not in results_markdown(report)
    report["cpu"] = [{"name": "baseline onnxruntime fp32", "latency_us": 100000.0, "latency_ratio": 1.0},
                     {"name": "pruned openvino int8", "latency_us": 25000.0, "latency_ratio": 3.9},
                     {"name": "baseline openvino int8", "error": "RuntimeError: boom"}]
    assert ("CPU runtimes, one slice, same run: baseline onnxruntime fp32 100.0 ms (1.00x); "
            "pruned openvino int8 25.0 ms (3.90x).") in results_markdown(report)


def test_the_results_renderer_adds_npu_columns_when_the_report_has_them():
    from nodulekit.report.readme import results_markdown

    lines = results_markdown(_report(npu=True)).splitlines()
    assert lines[0].endswith("| NPU weight memory (KiB) | NPU sim. recall (%) |")
    assert lines[2].endswith("| 236.81 | 76.5 |")
    assert lines[3].endswith("| 37.31 | 85.0 |")
    assert lines[4].endswith("| n/a | n/a |")


def test_report_readme_rewrites_only_the_block(tmp_path):
    import json

    from nodulekit.cli import main
    from nodulekit.report.readme import END, START, results_markdown

    (tmp_path / "report.json").write_text(json.dumps(_report(npu=False)))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{START}\nstale table\n{END}\nafter\n")
    assert main(["report", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text == f"# title\n\nbefore\n{START}\n{results_markdown(_report(npu=False))}\n{END}\nafter\n"
    assert not (tmp_path / "REPORT.md").exists()  # --readme touches the README only
    # idempotent: a second run changes nothing
    assert main(["report", str(tmp_path / "report.json"), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_report_readme_needs_the_markers(tmp_path):
    import json

    from nodulekit.errors import InputError
    from nodulekit.report.readme import update_readme

    (tmp_path / "report.json").write_text(json.dumps(_report(npu=False)))
    readme = tmp_path / "README.md"
    readme.write_text("# no block here\n")
    with pytest.raises(InputError):
        update_readme(readme, tmp_path)
    assert readme.read_text() == "# no block here\n"


def test_every_make_target_in_the_readme_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, flags=re.M))
    for line in readme_commands():
        argv = shlex.split(line)
        if argv[0] == "make":
            wanted = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
            assert set(wanted) <= targets, line


# ---------------------------------------------------------------------------------------------
# running them


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_data, cptac_mhd, lidc_dicom):
    from nodulekit.data.synth import generate_dataset

    """What the README's placeholders stand for, made small."""
    import SimpleITK as sitk
    import torch

    from nodulekit.data.luna import find_series
    from nodulekit.models.checkpoint import save_cls_checkpoint, save_seg_checkpoint
    from nodulekit.models.classifier import LunaModel
    from nodulekit.models.unet import SegModel

    d = tmp_path_factory.mktemp("readme")
    # the deployed input is 1x7x512x512, which RKNN int8 calibration insists on: a short 512 set
    demo_data = d / "runs" / "demo" / "data"
    generate_dataset(demo_data, n_scans=3, seed=1, size=512, max_slices=16, progress=False)
    torch.manual_seed(0)
    models = d / "runs" / "demo" / "models"
    models.mkdir(parents=True)
    seg, cls = SegModel().eval(), LunaModel().eval()
    # a fresh classifier head is zero, so its outputs would not depend on the input and the NPU
    # compiler folds the whole graph to a constant; a trained head is not
    torch.nn.init.normal_(cls.head_linear.weight, std=0.05)
    torch.nn.init.normal_(cls.head_linear.bias, std=0.05)
    save_seg_checkpoint(models / "seg.pt", seg)
    save_cls_checkpoint(models / "cls.pt", cls)
    # dlwpt-code's files: model_state plus bookkeeping
    for name, model, kind in (("seg_2020-01-01_12.00.00_final.best.state", seg, "UNetWrapper"),
                              ("cls.best.state", cls, "LunaModel")):
        torch.save({"sys_argv": ["x"], "time": "t", "model_name": kind, "model_state": model.state_dict(),
                    "optimizer_name": "SGD", "optimizer_state": {}, "epoch": 1, "totalTrainingSamples_count": 1},
                   d / name)
    scan = next(iter(find_series(synth_data).values()))
    sitk.WriteImage(sitk.ReadImage(str(scan)), str(d / "scan.nii.gz"))
    # 30 of the real scan's 99 slices: the README's detect commands on it run untrained models, which
    # mark nearly everything; reading the whole real header is tested in test_detect
    cptac = sitk.ReadImage(str(cptac_mhd))
    sitk.WriteImage(cptac[:, :, 35:65], str(d / "cptac_part.mhd"), True)
    return {
        "dir": d,
        "replace": [
            ("/path/to/dicom_series_folder", str(lidc_dicom)),
            ("LUNA16/subset3", str(synth_data / "subset0")),
            ("LUNA16", str(synth_data)),
            ("runs/demo/data", str(demo_data)),
            ("/fast/nodulekit-cache", str(d / "cache")),
            ("scan.mhd", str(d / "cptac_part.mhd")),
            ("annotations.csv", str(synth_data / "annotations.csv")),
        ],
    }


# README sizes -> test sizes (the flags stay; only their values shrink)
SHRINK = {"--epochs": "1", "--steps-per-epoch": "2", "--batch-size": "4", "--workers": "0",
          "--nproc_per_node": "2"}


def _argv_for_test(line: str, inputs) -> list[str]:
    for old, new in inputs["replace"]:
        line = re.sub(rf"(?<![\w/.-]){re.escape(old)}(?![\w.-])", new, line)
    argv = shlex.split(line)
    for i, a in enumerate(argv[:-1]):
        if a in SHRINK:
            argv[i + 1] = SHRINK[a]
    return argv


def _slow_extra(argv: list[str]) -> list[str]:
    """Flags that keep the heavy commands inside the suite's time (still the README's command)."""
    if argv[:1] == ["optimize"]:
        return ["--variants", "baseline", "--calib-slices", "2", "--bench-runs", "2", "--bench-warmup", "1",
                "--no-torchscript"]
    if argv[:1] == ["detect"]:  # untrained models mark a lot: fewer crops and pictures
        return ["--min-volume", "100", "--max-png", "1", "--no-progress"]
    steps = [] if "--steps-per-epoch" in argv else ["--steps-per-epoch", "2"]
    if argv[:2] == ["train", "seg"]:
        return ["--val-negative-slices", "1", *steps]
    if argv[:2] == ["train", "cls"]:
        return ["--val-max-negatives", "20", *steps]
    return []


@pytest.mark.slow
def test_every_readme_command_runs(inputs, monkeypatch):
    from nodulekit.deploy.rknn import rknn_available

    monkeypatch.chdir(inputs["dir"])
    ran = []
    moved: dict[str, str] = {}  # a README output -> where this test wrote it, for the commands that read it
    for line in readme_commands():
        argv = shlex.split(line)
        if argv[0] == "make":
            continue  # make demo / make test / make rknn are what CI and `make test` run
        if nodulekit_argv(line) is None:
            pytest.fail(f"README command neither make nor nodulekit: {line}")
        argv = _argv_for_test(line, inputs)
        if "rknn" in argv and not rknn_available():
            pytest.fail("the README's RKNN commands need .venv-rknn (make rknn)")
        if argv[0] == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        else:
            cmd = [sys.executable, "-m", "nodulekit", *argv[1:]]
        cmd += _slow_extra(cmd[cmd.index("nodulekit") + 1:])
        for i, a in enumerate(cmd):
            for src, dst in moved.items():
                if a == src or a.startswith(src + "/"):
                    cmd[i] = dst + a[len(src):]
        if "--out" in cmd:  # README outputs go under runs/: keep them apart per command
            i = cmd.index("--out") + 1
            new_out = str(inputs["dir"] / f"out{len(ran)}" / Path(cmd[i]).name)
            moved[cmd[i]], cmd[i] = new_out, new_out
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"{line}\n-> {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        out = Path(cmd[cmd.index("--out") + 1]) if "--out" in cmd else None
        if out is not None:
            written = out.is_file() and out.stat().st_size > 0 or out.is_dir() and any(out.iterdir())
            assert written, f"{line}: nothing written to {out}"
        ran.append(line)
    assert len(ran) >= 8
