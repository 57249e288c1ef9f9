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
    real = B.load_runner

    def spy(path, threads=2):
        run = real(path, threads)
        return lambda x: (order.append(str(path)), run(x))[1]

    monkeypatch.setattr(B, "load_runner", spy)
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
    with pytest.raises(InputError):
        B.load_runner(tmp_path / "x.bin")
    torch.set_num_threads(2)
