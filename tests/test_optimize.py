"""Compression study: the variants table end to end, pruning, PTQ and QAT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nodulekit.models.checkpoint import load_seg_model, save_seg_checkpoint
from nodulekit.models.unet import SegModel
from nodulekit.optimize import variants as V
from nodulekit.optimize.prune import parse_ratio, prune_seg

TINY = dict(finetune_epochs=1, qat_epochs=1, samples_per_epoch=16, batch_size=8, calib_slices=4, bench_runs=3,
            bench_warmup=1, bench_size=64, torchscript=False, progress=False)


@pytest.fixture(scope="module")
def datasets(synth_data):
    from nodulekit.data.seg_dataset import build_seg_datasets

    return build_seg_datasets(synth_data, samples_per_epoch=16, crop=64, val_negative_slices=2, progress=False)


@pytest.fixture(scope="module")
def study(datasets, synth_data, tmp_path_factory):
    from nodulekit.optimize.study import StudyConfig, run_study
    from nodulekit.report.render import render_report

    import nodulekit.deploy.measure as M

    out = tmp_path_factory.mktemp("study")
    events = []

    def timed(paths, **kwargs):
        events.append(("bench", len(paths)))
        return bench(paths, **kwargs)

    def before_timing():
        # every file the study times is written by now
        events.append(("wait", sorted(p.relative_to(out).as_posix() for p in out.rglob("*.onnx"))
                       + sorted(p.relative_to(out).as_posix() for p in out.rglob("*.xml"))))

    bench = M.bench
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "bench", timed)
        report = run_study(SegModel(), synth_data, out, StudyConfig(**TINY), datasets=datasets,
                           before_timing=before_timing)
    assert not (out / "REPORT.md").exists()  # rendering is the caller's step
    render_report(out)
    return out, report, events


@pytest.mark.parametrize("name", list(V.VARIANTS))
def test_every_variant_is_built_exported_and_measured(study, name):
    out, report, _ = study
    row = next(r for r in report["variants"] if r["name"] == name)
    assert "error" not in row, row.get("error")
    assert (out / row["artifact"]).is_file()
    assert row["artifact"].endswith(".int8.onnx") == V.is_quantized(name)
    assert row["weight_memory_kib"] > 0 and row["size_kib"] > 0 and row["latency_us"] > 0
    assert 0.0 <= row["recall"] <= 1.0
    assert row["stages"] == list(V.VARIANTS[name])
    assert (out / name / "seg.pt").is_file()
    model, ckpt = load_seg_model(out / name / "seg.pt")
    assert ckpt["variant"] == name
    if "prune" in V.VARIANTS[name]:
        assert model.current_widths().down[0][0] < 16


def test_study_ratios_and_files(study):
    out, report, _ = study
    rows = {r["name"]: r for r in report["variants"]}
    assert rows["pruned_qat"]["weight_memory_ratio"] > 5.84
    assert rows["ptq"]["weight_memory_kib"] < rows["baseline"]["weight_memory_kib"] / 3
    # the pruned stage is computed once and shared by both pruned_* variants
    assert rows["pruned_ptq"]["widths"] == rows["pruned_qat"]["widths"] == rows["pruned"]["widths"]
    assert "prune+finetune" in report["timings_s"] and "prune+finetune+qat" in report["timings_s"]
    assert json.loads((out / "report.json").read_text())["baseline"] == "baseline"
    # QAT picks its epoch on a few validation slices; the pruned fine-tuning on all of them
    qat_rows = rows["qat"]["history"]["qat_history"]
    assert qat_rows and all(0 < r["slices"] <= 16 for r in qat_rows)
    assert rows["pruned"]["history"]["finetune_history"][-1]["slices"] == report["dataset"]["val_slices"]
    # the pruned model's epoch is picked against the float baseline's recall on the same slices
    assert 0.0 <= rows["pruned"]["finetune_recall_target"] <= 1.0
    for name in ("REPORT.md", "REPORT.zh.md", "compression_bars.png", "recall_vs_latency.png",
                 "pruning_widths.png", "weight_histograms.png"):
        assert (out / name).is_file(), name


def test_cpu_table_measures_the_float_variants_in_every_cpu_runtime(study):
    """The CPU table: baseline and pruned in ONNX Runtime fp32, OpenVINO fp32 and OpenVINO int8, each
    row a deployed file with its size, latency and recall, ratios against ONNX Runtime's baseline."""
    pytest.importorskip("openvino")
    out, report, _ = study
    rows = {r["name"]: r for r in report["cpu"]}
    assert set(rows) == {f"{v} {rt}" for v in ("baseline", "pruned")
                         for rt in ("onnxruntime fp32", "openvino fp32", "openvino int8")}
    main = {r["name"]: r for r in report["variants"]}
    for name, row in rows.items():
        assert "error" not in row, row.get("error")
        assert row["latency_us"] > 0 and row["size_kib"] > 0 and 0.0 <= row["recall"] <= 1.0
        if row["runtime"] == "openvino":
            assert (out / row["artifact"]).is_file() and (out / row["artifact"]).with_suffix(".bin").is_file()
        else:  # the same file as the main table's row, with its figures
            assert row["artifact"] == main[row["variant"]]["artifact"]
            assert row["recall"] == main[row["variant"]]["recall"]
    assert rows["baseline onnxruntime fp32"]["latency_ratio"] == 1.0
    # int8 IR weights take about a quarter of the fp32 ones
    assert rows["baseline openvino int8"]["weight_memory_kib"] < rows["baseline openvino fp32"]["weight_memory_kib"] / 2
    # the fp32 IR computes what the ONNX graph computes
    assert abs(rows["baseline openvino fp32"]["recall"] - rows["baseline onnxruntime fp32"]["recall"]) < 0.01
    text = (out / "REPORT.md").read_text()
    assert "CPU runtimes" in text and "baseline openvino int8" in text
    assert "CPU 运行时" in (out / "REPORT.zh.md").read_text()


def test_latencies_are_timed_only_after_every_file_is_built_and_evaluated(study):
    """``before_timing`` (where the demo waits for the classifier's training) comes after every
    export and evaluation and before the first timed run; both tables are timed after it."""
    out, report, events = study
    assert [e[0] for e in events][0] == "wait" and [e[0] for e in events].count("wait") == 1
    written = events[0][1]
    for row in report["variants"]:
        assert row["artifact"] in written and "recall" in row and row["latency_us"] > 0
    assert [n for kind, n in events[1:]] == [len(report["variants"])] + ([len(report["cpu"])] if "cpu" in report else [])
    for row in report.get("cpu", []):
        assert row["artifact"] in written
    assert report["timings_s"]["wait"] >= 0


def test_variants_table_resolution():
    assert V.resolve(["pruned_qat"]) == ["baseline", "pruned_qat"]
    with pytest.raises(ValueError, match="unknown variant"):
        V.resolve(["nope"])


@pytest.mark.parametrize("spec, expected", [
    ("0.5", (0.5, {})),
    ("down_path.0=0.3,up_path.1=0.6", (0.0, {"down_path.0": 0.3, "up_path.1": 0.6})),
    ("0.4,down_path.2=0.25", (0.4, {"down_path.2": 0.25})),
    (0.5, (0.5, {})),
])
def test_parse_ratio(spec, expected):
    assert parse_ratio(spec) == expected


def test_parse_ratio_rejects_bad_values():
    with pytest.raises(ValueError):
        parse_ratio("1.5")


def test_prune_keeps_skips_shape_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = SegModel().eval()
    pruned = prune_seg(model, 0.5)
    w = pruned.current_widths()
    assert w.down == ((8, 8), (16, 16), (32, 32)) and w.up == ((16, 16, 16), (8, 8, 8))
    # decoder inputs stay consistent with the concatenation (upconv + skip)
    for block, skip in zip(pruned.unet.up_path, reversed([d for _, d in w.down[:-1]])):
        assert block.conv_block.block[0].in_channels == block.up.out_channels + skip
    assert model.current_widths().down[0] == (16, 16)  # the input model is untouched
    x = torch.randn(2, 7, 64, 64) * 400
    with torch.no_grad():
        y = pruned(x)
    assert y.shape == (2, 1, 64, 64)
    assert pruned.input_batchnorm.num_features == 7 and pruned.unet.last.in_channels == 8
    save_seg_checkpoint(tmp_path / "p.pt", pruned, variant="pruned")
    reloaded, _ = load_seg_model(tmp_path / "p.pt")
    with torch.no_grad():
        assert torch.equal(reloaded(x), y)


def test_prune_per_block_ratios():
    pruned = prune_seg(SegModel(), "0.5,down_path.0=0.25")
    assert pruned.current_widths().down[0] == (12, 12)
    assert pruned.current_widths().down[1] == (16, 16)
    with pytest.raises(ValueError, match="no U-Net block"):
        prune_seg(SegModel(), "down_path.9=0.5")


def test_ptq_calibration_picks_nodule_slices(datasets):
    from nodulekit.deploy.ptq import calibration_items

    scans = datasets[0].scans
    items = calibration_items(scans, 8)
    assert len(items) == 8
    assert sum(z in scans[s].label_slices for s, z in items) >= 4


def test_qat_onnx_agrees_with_fake_quant_model(datasets, tmp_path):
    from nodulekit.deploy.export import export
    from nodulekit.deploy.runtime import OnnxRunner
    from nodulekit.optimize import quantize as Q

    torch.manual_seed(0)
    prepared = Q.qat_prepare(prune_seg(SegModel(), 0.5))
    Q.set_train_mode(prepared)
    opt = torch.optim.Adam(prepared.parameters(), 1e-3)
    train = datasets[0]
    x, y = zip(*[train[i] for i in range(8)])
    for _ in range(2):
        loss = torch.nn.functional.binary_cross_entropy(prepared(torch.stack(x)), torch.stack(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    Q.set_eval_mode(prepared)
    art = export(Q.qat_convert(prepared), "onnx-int8", tmp_path / "qat.int8.onnx", variant="qat")
    assert art.quantization == "int8-qdq" and art.opset <= 19
    val = datasets[1]
    slices = np.stack([val[i][0] for i in range(min(4, len(val)))])
    with torch.no_grad():
        ref = prepared(torch.from_numpy(slices)).numpy()
    got = OnnxRunner(art.path)(slices)
    assert ((got > 0.5) == (ref > 0.5)).mean() >= 0.99
    _assert_weights_quantized_per_output_channel(art.path)


def _assert_weights_quantized_per_output_channel(path):
    """RKNN only takes per-channel weight scales along the output channels: axis 0 of a Conv
    weight (out, in, kH, kW), axis 1 of a ConvTranspose weight (in, out, kH, kW)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    checked = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        dq = producer.get(node.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{node.name}: weight is not quantized"
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        out_axis = 1 if node.op_type == "ConvTranspose" else 0
        assert axis == out_axis and scale.size == weight.shape[out_axis], (node.name, axis, scale.shape)
        checked += 1
    assert checked >= 10


def test_optimize_cli_baseline_only(synth_data, tmp_path, capsys):
    from nodulekit.cli import main

    save_seg_checkpoint(tmp_path / "seg.pt", SegModel())
    rc = main(["optimize", "--seg", str(tmp_path / "seg.pt"), "--data", str(synth_data), "--out", str(tmp_path / "s"),
               "--variants", "baseline", "--bench-runs", "2", "--bench-warmup", "1", "--no-torchscript"])
    assert rc == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert [r["name"] for r in report["variants"]] == ["baseline"]
    assert (tmp_path / "s" / "REPORT.zh.md").is_file() and "REPORT.md" in capsys.readouterr().out


def test_pruned_finetuning_has_its_own_epoch_length_and_keeps_the_baselines_recall(datasets, monkeypatch):
    import nodulekit.train.seg as seg_train
    from nodulekit.optimize.study import Build, StudyConfig, StudyContext, stage_finetune

    train_ds, val_ds = datasets
    seen = {}

    def fake_fit(model, train, val, **kwargs):
        seen.update(samples=len(train), rank=kwargs["rank"], cap=kwargs["dice_area_cap"])
        return [{"epoch": 1}]

    monkeypatch.setattr(seg_train, "fit_seg", fake_fit)
    torch.manual_seed(0)
    baseline = SegModel().eval()
    cfg = StudyConfig(**{**TINY, "finetune_samples_per_epoch": 40, "dice_area_cap": 256.0})
    ctx = StudyContext(cfg, train_ds, val_ds, {}, baseline)
    before = len(train_ds)
    out = stage_finetune(Build(prune_seg(baseline, "0.5")), ctx)
    assert seen["samples"] == 40 and len(train_ds) == before  # restored for QAT
    assert seen["cap"] == 256.0  # the study's own area cap, not training's
    target = out.meta["finetune_recall_target"]
    assert target == ctx.baseline_recall and 0.0 <= target <= 1.0
    above = {"nodule_recall": 1.0, "recall": min(1.0, target + 0.3), "dice": 0.1}
    at = {"nodule_recall": 1.0, "recall": target, "dice": 0.2}
    assert seen["rank"](at) > seen["rank"](above)  # past the baseline's recall, Dice decides


def test_score_runs_each_variant_end_to_end_and_the_report_leads_with_cpm(study, synth_data, tmp_path, capsys):
    """`nodulekit score`: each variant's deployed file through detection and FROC on two sets of
    scans; report.json gets a 'froc' object per variant (the schema checks it), the figures agree
    with `nodulekit evaluate` on the written detections, CPM change is against the baseline, and the
    reports (and a second report folder given with --also) lead with CPM and draw the CPM plots."""
    import shutil

    from nodulekit.cli import main
    from nodulekit.data.luna import find_series, read_annotations
    from nodulekit.data.split import write_split
    from nodulekit.evaluate.froc import evaluate_froc
    from nodulekit.models.checkpoint import save_cls_checkpoint
    from nodulekit.models.classifier import LunaModel
    from nodulekit.report.render import load_report, write_report_json

    out = tmp_path / "study"
    shutil.copytree(study[0], out)
    other = tmp_path / "demo_report"
    other.mkdir()
    write_report_json(load_report(out), other / "report.json")
    torch.manual_seed(0)
    save_cls_checkpoint(tmp_path / "cls.pt", LunaModel())
    uids = sorted(find_series(synth_data))
    split = write_split(tmp_path / "split.json", uids[1:], uids[:1])
    other_split = write_split(tmp_path / "split2.json", uids[:1] + uids[3:], uids[1:3])
    rc = main(["score", str(out), "--cls", str(tmp_path / "cls.pt"), "--variants", "baseline,pruned_qat",
               "--set", f"held_out={synth_data}@{split}", "--set", f"independent={synth_data}@{other_split}",
               "--cls-backend", "torch", "--also", str(other)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = load_report(out)
    rows = {r["name"]: r for r in report["variants"]}
    assert "froc" not in rows["pruned"] and "pruned_qat" in printed
    n_nodules = {u: 0 for u in uids}
    for a in read_annotations(synth_data / "annotations.csv"):
        n_nodules[a.seriesuid] += 1
    for name in ("baseline", "pruned_qat"):
        for set_name, scans in (("held_out", uids[:1]), ("independent", uids[1:3])):
            f = rows[name]["froc"][set_name]
            run = out / "froc" / set_name / name
            expected = evaluate_froc(run / "detect" / "nodules.csv", synth_data / "annotations.csv",
                                     synth_data / "annotations_excluded.csv", run / "seriesuids.csv")
            assert f["cpm"] == expected["cpm"] and f["n_scans"] == len(scans)
            assert f["n_nodules"] == sum(n_nodules[u] for u in scans) == expected["n_nodules"]
            assert f["nodules_found"] == expected["operating_points"]["at_threshold"]["true_positives"]
            marks = (run / "detect" / "nodules.csv").read_text().strip().splitlines()[1:]
            assert f["candidates_per_scan"] == round(len(marks) / len(scans), 1)
            assert f["runtime"] == "onnx" and f["seconds_per_scan"] > 0
            base = rows["baseline"]["froc"][set_name]["cpm"]
            assert f["cpm_change"] == pytest.approx(f["cpm"] - base, abs=1e-4)
    assert rows["baseline"]["froc"]["independent"]["cpm_change"] == 0
    for folder in (out, other):
        md, zh = (folder / "REPORT.md").read_text(), (folder / "REPORT.zh.md").read_text()
        assert "| Variant | CPM (independent draw) | CPM Change | Params |" in md
        assert "| 模型版本 | CPM（独立抽样） | CPM 变化 |" in zh
        assert "Why CPM leads" in md and "为何以 CPM 为主指标" in zh
        for png in ("cpm_vs_memory.png", "cpm_vs_latency.png"):
            assert (folder / png).stat().st_size > 0 and f"]({png})" in md
    assert load_report(other)["variants"][0]["froc"] == rows["baseline"]["froc"]
    # bad input: one line each
    assert main(["score", str(out), "--cls", str(tmp_path / "cls.pt"), "--set", f"x={synth_data}",
                 "--variants", "nope"]) == 1
    assert "no deployed variant named 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", str(out), "--cls", str(tmp_path / "cls.pt"), "--set", "no-equals-sign"])
    assert "NAME=DIR" in capsys.readouterr().err
