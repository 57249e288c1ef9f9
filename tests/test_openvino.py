"""OpenVINO: IR export of both models, fp32 parity with PyTorch, NNCF int8 against its float model,
and the runtime choice of ``auto``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from nodulekit.deploy.export import FORMATS, export  # noqa: E402
from nodulekit.deploy.runtime import load_runner, resolve_backend  # noqa: E402
from nodulekit.models.checkpoint import save_seg_checkpoint  # noqa: E402
from nodulekit.models.classifier import LunaModel  # noqa: E402

# fp32 OpenVINO against PyTorch: the same arithmetic up to the order of the sums (fused conv + ReLU
# + BatchNorm); a probability that moved by 1e-4 is a different graph, not rounding
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    from test_export import seg_model_with_statistics

    m = seg_model_with_statistics()
    # a trained detector calls most of a slice background with confidence: shift the logits so
    # that the thresholded pixels are a fair test of quantization, not a coin toss at logit 0
    with torch.no_grad():
        m.unet.last.bias.fill_(-2.0)
    return m


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(0)
    return rng.uniform(-1000, 1000, size=(2, 7, 64, 96)).astype(np.float32)


def _torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_formats_table_has_openvino_rows():
    for kind in ("seg", "cls"):
        assert FORMATS[(kind, "openvino")].suffix == ".xml"
        assert FORMATS[(kind, "openvino-int8")].suffix == ".int8.xml"


def test_openvino_fp32_matches_pytorch(model, slices, tmp_path):
    art = export(model, "openvino", tmp_path)
    assert art.path.endswith("model.xml") and (tmp_path / "model.bin").is_file()
    assert art.quantization == "fp32"
    runner = load_runner(art.path, "seg", "openvino", threads=1)
    assert runner.precision == "f32"
    ref = _torch(model, slices)
    got = runner(slices)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= FP32_TOL
    # dynamic shapes: another batch and slice size through the same compiled model
    other = slices[:1, :, :32, :48].copy()
    assert np.abs(runner(other) - _torch(model, other)).max() <= FP32_TOL


def test_openvino_reads_onnx_files(model, slices, tmp_path):
    art = export(model, "onnx", tmp_path)
    assert resolve_backend(art.path, "openvino") == "openvino"
    assert resolve_backend(art.path, "onnx") == "onnx"
    runner = load_runner(art.path, "seg", "openvino", threads=1)
    assert np.abs(runner(slices) - _torch(model, slices)).max() <= FP32_TOL


def test_openvino_int8_agrees_with_float(model, slices, tmp_path):
    art = export(model, "openvino-int8", tmp_path, calibration=slices)
    assert art.path.endswith("model.int8.xml") and art.quantization == "int8-nncf"
    assert art.extra["calibration"]["slices"] == len(slices)
    runner = load_runner(art.path, "seg", "openvino", threads=1)
    assert runner.precision == "int8"
    ref = _torch(model, slices)
    got = runner(slices)
    assert ((got > 0.5) == (ref > 0.5)).mean() >= 0.99


def test_openvino_classifier_any_batch_and_crop_spacing(tmp_path):
    torch.manual_seed(0)
    cls = LunaModel(crop_spacing=(1.25, 0.8, 0.8)).eval()
    torch.nn.init.normal_(cls.head_linear.weight, std=0.01)
    art = export(cls, "openvino", tmp_path, kind="cls")
    assert art.path.endswith("cls.xml")
    runner = load_runner(art.path, "cls", threads=1)
    assert runner.crop_spacing == (1.25, 0.8, 0.8)
    x = np.random.default_rng(1).uniform(-1000, 1000, (3, 1, 32, 48, 48)).astype(np.float32)
    with torch.no_grad():
        ref = cls(torch.from_numpy(x))[1][:, 1].numpy()
    got = runner(x)
    assert got.shape == (3,)
    assert np.abs(got - ref).max() <= FP32_TOL


def test_auto_exports_a_checkpoint_once_to_the_cache(model, slices, tmp_path, monkeypatch):
    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / "cache"))
    save_seg_checkpoint(tmp_path / "seg.pt", model)
    assert resolve_backend(tmp_path / "seg.pt", "auto") == "openvino"
    runner = load_runner(tmp_path / "seg.pt", "seg", "auto", threads=1)
    assert np.abs(runner(slices) - _torch(model, slices)).max() <= FP32_TOL
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*"))
    assert [f for f in files if f.endswith(".xml")] == ["model.xml"]
    first = next((tmp_path / "cache").rglob("model.xml")).stat().st_mtime_ns
    load_runner(tmp_path / "seg.pt", "seg", "auto", threads=1)
    assert next((tmp_path / "cache").rglob("model.xml")).stat().st_mtime_ns == first


def test_auto_falls_back_to_onnx_runtime_without_openvino(tmp_path, monkeypatch):
    import nodulekit.deploy.openvino as ov

    monkeypatch.setattr(ov, "openvino_available", lambda: False)
    assert resolve_backend(tmp_path / "seg.pt", "auto") == "onnx"
    assert resolve_backend(tmp_path / "seg.onnx", "auto") == "onnx"
    assert resolve_backend(tmp_path / "seg.xml", "auto") == "openvino"


def test_export_cli_writes_both_ir_forms(model, slices, tmp_path, capsys, monkeypatch):
    import json

    from nodulekit.cli import export as cli_export
    from nodulekit.cli import main

    monkeypatch.setattr(cli_export, "_calibration", lambda args, kind, m, fmt: slices)
    save_seg_checkpoint(tmp_path / "seg.pt", model)
    assert main(["export", str(tmp_path / "seg.pt"), "-f", "openvino", "openvino-int8", "--out",
                 str(tmp_path / "o"), "--data", "unused"]) == 0
    arts = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(a["format"], a["quantization"]) for a in arts] == [("openvino", "fp32"), ("openvino-int8", "int8-nncf")]
    assert all((tmp_path / "o" / name).is_file() for name in ("model.xml", "model.bin", "model.int8.xml",
                                                              "model.int8.bin"))


_SIGNAL_SCRIPT = """
import faulthandler, signal, subprocess, sys
from nodulekit.deploy import openvino as nk_ov
if sys.argv[2] == "unpinned":
    nk_ov.pin_signal_stack = lambda: None
faulthandler.enable()
signal.signal(signal.SIGCHLD, lambda *_: None)  # as torch's DataLoader leaves it
a = nk_ov.OpenVinoRunner(sys.argv[1], threads=1)
b = nk_ov.OpenVinoRunner(sys.argv[1], threads=1)
del a  # freed in another order than compiled
del b
for _ in range(3):
    subprocess.run([sys.executable, "-c", "pass"], check=True)
print("alive")
"""


def test_runners_freed_out_of_order_leave_signal_handling_intact(model, tmp_path):
    """OpenVINO swaps the thread's alternate signal stack per compiled model; two runners freed out
    of order would leave it dangling and the next SIGCHLD would kill the process (SIGSEGV). The
    runner pins a stack of its own after compiling, so the process survives its subprocesses."""
    import subprocess
    import sys

    art = export(model, "onnx", tmp_path)
    run = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT, art.path, "pinned"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "alive" in run.stdout, run.stderr[-2000:]


def test_training_validates_through_openvino_with_the_same_metrics(model, synth_data):
    """Training validates a plain U-Net in OpenVINO (faster) and a fake-quantized one in PyTorch;
    the thresholded metrics equal PyTorch's."""
    from nodulekit.data.seg_dataset import build_seg_datasets
    from nodulekit.deploy.openvino import OpenVinoRunner
    from nodulekit.evaluate.seg_metrics import evaluate_seg
    from nodulekit.train.seg import fast_predictor, torch_predictor

    import copy

    _, val = build_seg_datasets(synth_data, samples_per_epoch=4, val_negative_slices=2, progress=False)
    model = copy.deepcopy(model)
    # about a tenth of the pixels above the threshold, so that the counts test something
    p90 = float(np.quantile(torch_predictor(model.eval())(np.stack([val[i][0] for i in range(2)])), 0.9))
    with torch.no_grad():
        model.unet.last.bias -= float(np.log(p90 / (1 - p90)))
    trained_like = model.to(memory_format=torch.channels_last).train()  # as fit_seg holds it
    fast = fast_predictor(trained_like.eval(), "cpu", torch.channels_last)
    assert isinstance(fast, OpenVinoRunner)
    assert trained_like.unet.last.weight.is_contiguous(memory_format=torch.channels_last)  # left as it was
    got, want = evaluate_seg(fast, val), evaluate_seg(torch_predictor(model.eval()), val)
    assert want["slices"] > 0 and want["tp"] + want["fp"] > 0
    # float rounding moves a few pixels that sit at the threshold: at most 0.1 % of the counted ones
    for key in ("tp", "fp", "fn", "nodules_found"):
        assert abs(got[key] - want[key]) <= max(2, 1e-3 * (want["tp"] + want["fp"] + want["fn"])), key
    graph = torch.fx.symbolic_trace(model)  # not a SegModel: stays in PyTorch
    assert not isinstance(fast_predictor(graph), OpenVinoRunner)


def _small_calibration(monkeypatch):
    """A 16-crop calibration from one synthetic scan: the int8 tests check the plumbing; the
    default's 128 crops are what the shipped classifier's test uses."""
    import nodulekit.deploy.ptq as ptq

    calls = []
    full = ptq.synthetic_cls_crops

    def small(crop_spacing=None, context=None):
        calls.append((crop_spacing, context))
        return full(crop_spacing, context, n=16, scans=1)

    monkeypatch.setattr(ptq, "synthetic_cls_crops", small)
    return calls


def test_an_int8_classifier_is_quantized_once_from_its_checkpoint_and_cached(tmp_path, monkeypatch):
    from nodulekit.models.checkpoint import save_cls_checkpoint

    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / "cache"))
    calls = _small_calibration(monkeypatch)
    torch.manual_seed(0)
    cls = LunaModel(crop_spacing=(1.25, 0.8, 0.8)).eval()
    torch.nn.init.normal_(cls.head_linear.weight, std=0.01)
    ckpt = save_cls_checkpoint(tmp_path / "cls.pt", cls)
    runner = load_runner(ckpt, "cls", "auto", threads=1, int8=True)
    assert calls == [((1.25, 0.8, 0.8), None)]  # calibrated on crops cut at the model's own spacing
    assert runner.crop_spacing == (1.25, 0.8, 0.8)
    xml = [p for p in (tmp_path / "cache").rglob("*.xml")]
    assert len(xml) == 1 and "openvino-int8" in xml[0].parent.name
    assert "FakeQuantize" in xml[0].read_text() or 'element_type="i8"' in xml[0].read_text()
    x = np.random.default_rng(1).uniform(-1000, 1000, (3, 1, 32, 48, 48)).astype(np.float32)
    got = runner(x)
    assert got.shape == (3,) and np.isfinite(got).all()
    load_runner(ckpt, "cls", "openvino", threads=1, int8=True)
    assert len(calls) == 1  # the second run reads the cache
    fp32 = load_runner(ckpt, "cls", "auto", threads=1)
    assert len(list((tmp_path / "cache").rglob("*.xml"))) == 2 and fp32.crop_spacing == (1.25, 0.8, 0.8)


def test_int8_at_run_time_is_refused_where_it_does_not_apply(tmp_path):
    from nodulekit.errors import InputError
    from nodulekit.models.checkpoint import save_cls_checkpoint

    ckpt = save_cls_checkpoint(tmp_path / "cls.pt", LunaModel().eval())
    with pytest.raises(InputError, match="not torch"):
        load_runner(ckpt, "cls", "torch", int8=True)
    with pytest.raises(InputError, match="not onnx"):
        load_runner(ckpt, "cls", "onnx", int8=True)
    art = export(ckpt, "openvino", tmp_path / "o", kind="cls")
    with pytest.raises(InputError, match="deployed file runs as it is"):
        load_runner(art.path, "cls", "openvino", int8=True)
    with pytest.raises(ValueError, match="classifier only"):
        load_runner(tmp_path / "seg.pt", "seg", "auto", int8=True)


def test_synthetic_calibration_crops_are_deterministic_and_hold_nodules():
    from nodulekit.data.synth.scan import generate_scan
    from nodulekit.deploy.ptq import synthetic_cls_crops

    a = synthetic_cls_crops((1.25, 0.8, 0.8), 2.5, n=12, scans=1, seed=3)
    b = synthetic_cls_crops((1.25, 0.8, 0.8), 2.5, n=12, scans=1, seed=3)
    assert a.shape == (12, 2, 32, 48, 48) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1000 and a.max() <= 1000
    n_nodules = len(generate_scan(3, 0, max_slices=64).nodules)
    assert n_nodules >= 1
    # the nodules come first: a solid nodule makes its crop's centre denser than lung
    centre = a[:n_nodules, 0, 14:18, 22:26, 22:26].mean(axis=(1, 2, 3))
    assert (centre > -700).any()
