"""Interleaved latency measurement."""

from __future__ import annotations

import pytest
import torch

from nodulekit.deploy import bench as B
from nodulekit.deploy.export import export
from nodulekit.models.unet import SegModel
from nodulekit.optimize.prune import prune_seg


def test_bench_interleaves_and_returns_medians(tmp_path, monkeypatch):
    model = SegModel().eval()
    paths = [export(model, "onnx", tmp_path / "a.onnx").path,
             export(prune_seg(model, 0.5), "onnx", tmp_path / "b.onnx").path,
             export(model, "torchscript", tmp_path / "c.ts").path]
    order = []
    real = B._runner

    def spy(path, threads, kind):
        run = real(path, threads, kind)
        return lambda x: (order.append(str(path)), run(x))[1]

    monkeypatch.setattr(B, "_runner", spy)
    rows = B.bench(paths + [str(tmp_path / "missing.onnx")], runs=4, warmup=1, shape=(1, 7, 32, 32))
    by_path = {r["artifact"]: r for r in rows}
    assert "error" in by_path[str(tmp_path / "missing.onnx")]
    for p in paths:
        r = by_path[p]
        assert r["latency_us"] > 0 and r["p10_us"] <= r["latency_us"] <= r["p90_us"] and r["runs"] == 4
    timed = order[3:]  # after one warm-up run each
    assert len(timed) == 12
    # round robin: every iteration runs each artifact once, starting from a rotating position
    for i in range(4):
        chunk = timed[3 * i:3 * i + 3]
        assert sorted(chunk) == sorted(paths) and chunk[0] == paths[i % 3]


def test_bench_cli(tmp_path, capsys):
    from nodulekit.cli import main

    path = export(SegModel(), "onnx", tmp_path / "a.onnx").path
    assert main(["bench", path, "--runs", "2", "--warmup", "1", "--size", "32", "--json", str(tmp_path / "b.json")]) == 0
    assert "median" in capsys.readouterr().out and (tmp_path / "b.json").is_file()


def test_bench_rejects_unknown_file(tmp_path):
    from nodulekit.errors import InputError

    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(InputError, match="cannot benchmark"):
        B._runner(tmp_path / "x.bin", 2, "seg")
    torch.set_num_threads(2)


def test_bench_times_a_given_input(tmp_path):
    """The classifier's rows are timed on one real crop, through the same timer."""
    import numpy as np

    from nodulekit.models.classifier import LunaModel

    path = export(LunaModel().eval(), "onnx", tmp_path / "c.onnx", kind="cls").path
    x = np.zeros((1, 1, 32, 48, 48), np.float32)
    (row,) = B.bench([path], runs=2, warmup=1, x=x, kind="cls")
    assert "error" not in row and row["latency_us"] > 0


def test_scan_bench_rows_stages_and_cpu(tmp_path, capsys):
    """``bench --scan``: every row runs interleaved on one scan; stages, candidates and the CPU come back."""
    import json
    import sys

    from nodulekit.cli import main
    from nodulekit.data.ct import write_ct
    from nodulekit.detect.profile import cpu_info
    from nodulekit.models.checkpoint import save_cls_checkpoint, save_seg_checkpoint
    from nodulekit.models.classifier import LunaModel

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_detect import phantom_ct

    torch.manual_seed(0)
    model = SegModel().eval()
    with torch.no_grad():
        model.unet.last.bias.fill_(-30.0)  # nothing marked: the plumbing is tested, not the classifier's speed
    seg = save_seg_checkpoint(tmp_path / "seg.pt", model)
    cls = save_cls_checkpoint(tmp_path / "cls.pt", LunaModel())
    scan = write_ct(phantom_ct(depth=10), tmp_path / "p.mhd")
    rows = ["torch fp32", "onnxruntime fp32"] + (["openvino fp32"] if _has_openvino() else [])
    rc = main(["bench", "--scan", str(scan), "--seg", str(seg), "--cls", str(cls), "--rows", *rows,
               "--repeats", "2", "--max-png", "1", "--json", str(tmp_path / "scan.json"), "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| row | lung_mask | segmentation |" in out and "CPU:" in out
    result = json.loads((tmp_path / "scan.json").read_text())
    assert [r["name"] for r in result["rows"]] == rows
    for r in result["rows"]:
        assert "error" not in r and set(r["stages_s"]) >= {"lung_mask", "segmentation", "candidates", "total"}
        assert r["same_as_first"]
    cpu = cpu_info()
    assert result["cpu"]["model_name"] == cpu["model_name"] and result["threads"] == 1
    assert isinstance(cpu["key_flags"], list) and cpu["cpus"] >= 1


def _has_openvino() -> bool:
    from nodulekit.deploy.openvino import openvino_available

    return openvino_available()


def test_scan_bench_rows_of_a_deployed_variant_keep_apart_the_int8_classifier(tmp_path, monkeypatch):
    """A deployed variant's rows are named by runtime; the int8-classifier row must not take the
    name of the fp32 one (the runners are kept by name)."""
    from types import SimpleNamespace

    import nodulekit.deploy.export as E
    import nodulekit.deploy.ptq as P
    import nodulekit.models.checkpoint as C
    from nodulekit.detect.profile import ROWS, prepare_rows

    if not _has_openvino():
        pytest.skip("OpenVINO not installed")
    monkeypatch.setattr(E, "export", lambda src, fmt, dest, **kw: SimpleNamespace(path=str(dest)))
    monkeypatch.setattr(P, "synthetic_cls_crops", lambda *a, **k: None)
    monkeypatch.setattr(C, "load_cls_model", lambda path: (SimpleNamespace(crop_spacing=None, context=None), {}))
    rows = [r for r in ROWS if not r[1] or not r[1].endswith("int8")]
    table = prepare_rows("seg.pt", "cls.pt", None, None, tmp_path, rows=rows,
                         variants={"q": str(tmp_path / "q.int8.onnx")})
    names = [r.name for r in table]
    assert not [r.error for r in table if r.error]
    assert len(names) == len(set(names))
    assert {"q openvino", "q openvino, int8 classifier", "openvino fp32, int8 classifier"} <= set(names)
    assert next(r for r in table if r.name == "q openvino, int8 classifier").cls.endswith(".int8.xml")
