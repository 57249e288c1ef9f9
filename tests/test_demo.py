"""The demo's stage helpers, its failure handling, and (slow) the quick demo end to end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodulekit import demo
from nodulekit.data.synth.scan import GENERATOR_VERSION
from nodulekit.demo import DemoConfig, DemoStageError, StageResult, _synth


def test_quick_mode_is_smaller_in_every_stage():
    full, quick = DemoConfig.for_mode(quick=False), DemoConfig.for_mode(quick=True)
    assert quick.scans < full.scans and quick.size < full.size
    assert quick.qat_epochs <= full.qat_epochs and quick.bench_runs < full.bench_runs
    assert full.qat_epochs >= 1 and full.scans >= 8
    # the demo keeps the classifier's last epoch, so it validates that one alone
    assert full.cls_settings()["val_every"] == full.cls_settings()["epochs"]
    assert quick.cls_epochs < full.cls_epochs and quick.mine_slices < full.mine_slices


def test_synthetic_data_is_reused_only_with_the_same_parameters(tmp_path, monkeypatch):
    calls, hilas = [], []

    def fake_generate(out, n_scans, seed, **kw):
        calls.append(n_scans if seed == 0 else (n_scans, seed))
        hilas.append(kw["hila"])
        out.mkdir(parents=True, exist_ok=True)
        summary = {"scans": n_scans}
        params = {"seed": seed, "n_scans": n_scans, "size": kw["size"], "max_slices": kw["max_slices"],
                  "version": GENERATOR_VERSION}
        (out / "synth.json").write_text(json.dumps({"parameters": params, "summary": summary}))
        return summary

    monkeypatch.setattr("nodulekit.data.synth.generate_dataset", fake_generate)
    cfg = DemoConfig.for_mode(quick=True)
    data = tmp_path / "data"
    assert _synth(cfg, data) == {"scans": cfg.scans}
    assert _synth(cfg, data) == {"scans": cfg.scans} and calls == [cfg.scans]
    cfg.scans += 1
    _synth(cfg, data)
    assert calls == [cfg.scans - 1, cfg.scans]
    # the draw follows data_seed when it is set, whatever the training seed
    cfg.seed = 5
    _synth(cfg, data)
    assert calls[-1] == (cfg.scans, 5)
    cfg.data_seed = 0
    _synth(cfg, data)
    assert calls[-1] == cfg.scans and len(calls) == 4
    # a synth.json without "hila" (written before the choice existed) is the simple anatomy's draw
    _synth(cfg, data)
    assert len(calls) == 4
    cfg.synth_hila = "lobar"
    _synth(cfg, data)
    assert len(calls) == 5 and hilas[-1] == "lobar"
    cfg.synth_hila = "simple"  # the fake's synth.json has no "hila": read as the simple draw, reused
    _synth(cfg, data)
    assert len(calls) == 5
    # a draw of an older generator (no version, or another one) is drawn again
    for version in (None, GENERATOR_VERSION - 1):
        doc = json.loads((data / "synth.json").read_text())
        doc["parameters"]["version"] = version
        (data / "synth.json").write_text(json.dumps(doc))
        _synth(cfg, data)
    assert len(calls) == 7
    _synth(cfg, data)
    assert len(calls) == 7


def test_demo_holds_out_the_same_number_of_scans_whatever_its_size():
    from nodulekit.data.split import train_val_split

    for scans, held_out in ((20, 3), (12, 3), (40, 3), (4, 2)):
        cfg = DemoConfig.for_mode(quick=False, scans=scans)
        uids = [f"1.2.{i}" for i in range(scans)]
        assert len(train_val_split(uids, cfg.val_fraction)[1]) == held_out, scans
    quick = DemoConfig.for_mode(quick=True)
    assert len(train_val_split([f"u{i}" for i in range(quick.scans)], quick.val_fraction)[1]) == 2


def _fake_dataset(root: Path, n: int) -> list[str]:
    uids = [f"1.2.{i}" for i in range(n)]
    (root / "subset0").mkdir(parents=True)
    for u in uids:
        (root / "subset0" / f"{u}.mhd").write_text("")
    return uids


def test_data_stage_writes_the_split_once_as_the_training_split(tmp_path, monkeypatch):
    from nodulekit.data.split import load_split, train_val_split

    cfg = DemoConfig.for_mode(quick=True, out=str(tmp_path / "out"))
    monkeypatch.setattr(demo, "_synth", lambda cfg, data: _fake_dataset(data, cfg.scans) and {"scans": cfg.scans})
    res = demo.data_stage(cfg, tmp_path / "out")
    assert res.files["split"] == tmp_path / "out" / "split.json" and res.files["data"] == tmp_path / "out" / "data"
    train, val = load_split(res.files["split"])
    assert (train, val) == train_val_split([f"1.2.{i}" for i in range(cfg.scans)], cfg.val_fraction)
    assert len(val) == 2 and not set(train) & set(val)


def test_write_deployed_lists_the_models_and_the_detect_options(tmp_path):
    doc = demo.write_deployed(tmp_path / "models", seg=Path("o/optimize/baseline/model.onnx"), cls=Path("m/cls.pt"))
    assert json.loads((tmp_path / "models" / "deployed.json").read_text()) == doc
    assert doc["backend"] == "onnx" and doc["cls_backend"] == "torch"
    assert doc["detect_args"] == ["--seg", "o/optimize/baseline/model.onnx", "--backend", "onnx",
                                  "--cls", "m/cls.pt", "--cls-backend", "torch"]


def test_stages_time_each_stage_and_name_the_one_that_failed():
    stages = demo._Stages()
    with stages.stage("ok"):
        pass
    with stages.stage("optional", optional=True):
        raise RuntimeError("first line\nsecond line")
    with stages.stage("beside") as own:  # work done in a child process reports its own time
        own["seconds"] = 81.96
    assert set(stages.timings) == {"ok", "optional", "beside"} and stages.timings["beside"] == 82.0
    assert stages.failed == {"optional": "RuntimeError: first line"}
    with pytest.raises(DemoStageError) as err:
        with stages.stage("needed"):
            raise ValueError("bad input")
    assert str(err.value) == ("stage optional failed: RuntimeError: first line; "
                              "stage needed failed: ValueError: bad input")
    assert "needed" not in stages.timings
    stages.check_scans("detect", [])
    assert "detect" not in stages.failed
    stages.check_scans("detect", [{"error": "x.mhd: no such file"}, {"error": "y"}])
    assert stages.failed["detect"] == "2 scan(s) failed, e.g. x.mhd: no such file"


def _stub_stages(monkeypatch, tmp_path, *, classifier_fails: bool) -> dict:
    """Replace every stage of run_demo with a stub that records what it was handed."""
    seen = {}
    files = {"data": tmp_path / "data", "split": tmp_path / "split.json"}

    def classifier(cfg, out, data, cls_ckpt, rknn):
        if classifier_fails:
            raise RuntimeError("no crops")
        return StageResult({"rows": [{"name": "cls3d_onnx_fp32"}]}, {"onnx": out / "classifier" / "cls3d.onnx"})

    def detect(cfg, out, data, deployed):
        seen["deployed"] = deployed
        return StageResult({"failed": []}, {"csv": out / "detect" / "nodules.csv"})

    def final(cfg, report, *args):
        seen["report"] = report
        return report

    monkeypatch.setattr("nodulekit.deploy.rknn.rknn_available", lambda: False)
    monkeypatch.setattr(demo, "data_stage", lambda cfg, out: StageResult({}, files))
    monkeypatch.setattr(demo, "train_seg_stage", lambda cfg, out, data: StageResult({}, {"checkpoint": out / "seg.pt"}))
    monkeypatch.setattr(demo, "mine_stage", lambda *a: StageResult({"failed": []}, {"candidates": tmp_path / "c.csv"}))
    monkeypatch.setattr(demo, "Beside", demo.Inline)  # a stub does not cross to a child process

    def train_cls(cfg, out, data, candidates, threads=None):
        seen["cls_threads"] = threads
        return StageResult({}, {"checkpoint": tmp_path / "cls.pt"})

    def optimize(cfg, out, data, seg_ckpt, rknn, before_timing=None):
        before_timing()
        return StageResult({"baseline": "baseline", "variants": []}, {"onnx": out / "optimize" / "baseline" / "model.onnx"})

    monkeypatch.setattr(demo, "train_cls_stage", train_cls)
    monkeypatch.setattr(demo, "optimize_stage", optimize)
    monkeypatch.setattr(demo, "classifier_stage", classifier)
    monkeypatch.setattr(demo, "detect_stage", detect)
    monkeypatch.setattr(demo, "evaluate_stage", lambda *a: StageResult({}, {}))
    monkeypatch.setattr(demo, "_final_report", final)
    monkeypatch.setattr(demo, "_print_summary", lambda report, report_dir: None)
    return seen


def test_run_demo_hands_each_stage_the_files_of_the_earlier_ones(tmp_path, monkeypatch):
    seen = _stub_stages(monkeypatch, tmp_path, classifier_fails=False)
    out = tmp_path / "out"
    report = demo.run_demo(DemoConfig.for_mode(quick=True, out=str(out)))
    assert seen["deployed"]["seg"] == str(out / "optimize" / "baseline" / "model.onnx")
    assert seen["deployed"]["cls"] == str(out / "classifier" / "cls3d.onnx")
    assert json.loads((out / "models" / "deployed.json").read_text()) == seen["deployed"]
    assert report["classifier"] == [{"name": "cls3d_onnx_fp32"}] and "failed_stages" not in report
    assert seen["cls_threads"] == 1  # the study has the other core


def test_a_stage_beside_returns_its_value_and_time_or_its_failure_in_one_line():
    import math

    for runner in (demo.Beside, demo.Inline):
        value, seconds = runner(math.factorial, 5).result()
        assert value == 120 and seconds >= 0
        failed = runner(math.factorial, -1)
        failed.wait()
        with pytest.raises(Exception) as err:
            failed.result()
        assert demo._one_line(err.value) == "ValueError: factorial() not defined for negative values"
        failed.stop()
    died = demo.Beside(os._exit, 3)  # no exception comes back from a process that vanished
    with pytest.raises(demo.ChildStageError, match=r"died \(exit code 3\)$"):
        died.result()
    slow = demo.Beside(time.sleep, 60)
    t0 = time.perf_counter()
    slow.stop()  # after a failure beside it, the demo does not wait for the rest of the training
    assert time.perf_counter() - t0 < 30 and not slow._proc.is_alive()


def test_a_failed_classifier_study_is_reported_and_fails_the_demo(tmp_path, monkeypatch):
    seen = _stub_stages(monkeypatch, tmp_path, classifier_fails=True)
    with pytest.raises(DemoStageError, match=r"^stage classifier_npu failed: RuntimeError: no crops$"):
        demo.run_demo(DemoConfig.for_mode(quick=True, out=str(tmp_path / "out")))
    report = seen["report"]  # written before the demo stops
    assert report["failed_stages"] == {"classifier_npu": "RuntimeError: no crops"}
    assert report["classifier"] == [{"name": "classifier", "error": "RuntimeError: no crops"}]
    assert seen["deployed"]["cls"] == str(tmp_path / "cls.pt") and seen["deployed"]["cls_backend"] == "torch"


def test_the_cli_prints_the_failed_stage_in_one_line_and_exits_non_zero(monkeypatch, capsys):
    from nodulekit.cli import main

    def fail(cfg):
        raise DemoStageError({"classifier_npu": "RuntimeError: no crops"})

    monkeypatch.setattr(demo, "run_demo", fail)
    assert main(["demo", "--quick", "--no-rknn"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "nodulekit demo: error: stage classifier_npu failed: RuntimeError: no crops"


def test_summary_prints_the_ratios_the_rows_hold(capsys):
    row = {"name": "ptq", "weight_memory_kib": 100.0, "latency_us": 2000.0, "recall": 0.5,
           "weight_memory_ratio": 3.5, "latency_ratio": 1.25, "recall_change_pts": -2.0}
    demo._print_summary({"baseline": "baseline", "variants": [row, {"name": "qat", "error": "boom"}]}, Path("r"))
    lines = capsys.readouterr().out.splitlines()
    ptq = next(line for line in lines if line.startswith("ptq")).split()
    assert ptq == ["ptq", "100.00", "3.50", "2.0", "1.25", "50.0", "-2.0"]
    assert any(line.startswith("qat") and "failed: boom" in line for line in lines)
    bare = {k: v for k, v in row.items() if not k.endswith(("_ratio", "_pts"))}
    demo._print_summary({"baseline": "baseline", "variants": [bare]}, Path("r"))
    header, line = capsys.readouterr().out.splitlines()[1:3]
    assert line.split() == ["ptq", "100.00", "n/a", "2.0", "n/a", "50.0", "n/a"] and len(line) == len(header)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """``nodulekit demo --quick`` as a user runs it: exit 0 and a consistent report. The RKNN
    builds are left out: they need ``.venv-rknn`` and are slow, and test_rknn covers them."""
    from nodulekit.data.split import load_split

    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(demo.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "nodulekit", "demo", "--quick", "--no-rknn", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report_dir = out / "report"
    report = json.loads((report_dir / "report.json").read_text())
    assert (report_dir / "REPORT.md").is_file() and (report_dir / "REPORT.zh.md").is_file()
    assert "failed_stages" not in report
    assert report["variants"] and all("error" not in r for r in report["variants"])
    assert 0.0 <= report["detection"]["cpm"] <= 1.0
    train, val = load_split(out / "split.json")
    detected = json.loads((out / "detect" / "nodules.json").read_text())
    assert sorted(s["seriesuid"] for s in detected["scans"]) == sorted(val)
    assert report["detection"]["n_scans"] == len(val) and not set(train) & set(val)
    # the report links each held-out scan's viewer, and the link opens from the report's folder
    assert sorted(report["detection"]["viewers"]) == sorted(val)
    assert all((report_dir / p).is_file() for p in report["detection"]["viewers"].values())
    assert all(p in (report_dir / "REPORT.md").read_text() for p in report["detection"]["viewers"].values())
    if report.get("cpu"):  # OpenVINO installed: the CPU table has every runtime's row
        assert all("error" not in r for r in report["cpu"])
    deployed = json.loads((out / "models" / "deployed.json").read_text())
    assert deployed["backend"] == deployed["cls_backend"] == "onnx"
    assert Path(deployed["seg"]).is_file() and Path(deployed["cls"]).is_file()


def test_a_training_follows_the_thread_budget_its_parent_sets():
    import multiprocessing

    import torch

    from nodulekit.train import threads

    before = torch.get_num_threads()
    budget = multiprocessing.get_context("spawn").Value("i", 0)
    threads.attach(budget)
    try:
        threads.follow()  # no budget set yet: the count stays
        assert torch.get_num_threads() == before
        budget.value = 1
        threads.follow()
        assert torch.get_num_threads() == 1
        budget.value = 2
        threads.follow()
        assert torch.get_num_threads() == 2
    finally:
        threads.attach(None)
        torch.set_num_threads(before)
    child = demo.Beside(time.sleep, 0)
    child.set_threads(2)  # what the child's training loop reads
    assert child._threads.value == 2
    child.result()
