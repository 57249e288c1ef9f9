"""Exporter: formats table, round trips in each runtime, weight-memory accounting."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nodulekit.deploy.export import FORMAT_NAMES, FORMATS, Artifact, export
from nodulekit.deploy.onnx_utils import param_count, weight_memory_bytes
from nodulekit.errors import InputError
from nodulekit.models.checkpoint import save_seg_checkpoint
from nodulekit.models.classifier import LunaModel
from nodulekit.models.unet import SegModel


def seg_model_with_statistics() -> SegModel:
    """An untrained U-Net (seed 0) with non-trivial BatchNorm statistics, so that a round trip tests
    more than an identity (the OpenVINO tests use it too)."""
    torch.manual_seed(0)
    m = SegModel().eval()
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    m.input_batchnorm.running_var.fill_(400.0 ** 2)
    return m


@pytest.fixture(scope="module")
def model():
    return seg_model_with_statistics()


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(0)
    return rng.uniform(-1000, 1000, size=(2, 7, 64, 96)).astype(np.float32)


def test_formats_table():
    assert FORMAT_NAMES == ("onnx", "onnx-int8", "torchscript", "rknn", "rknn-int8", "openvino", "openvino-int8")
    assert set(FORMATS) == {(k, f) for k in ("seg", "cls") for f in FORMAT_NAMES}
    with pytest.raises(ValueError, match="unknown format"):
        export(SegModel(), "tflite", "x")
    with pytest.raises(ValueError, match="unknown model kind"):
        export(SegModel(), "onnx", "x", kind="det")
    # a combination the table does not offer says why
    assert FORMATS[("cls", "torchscript")].fn is None
    with pytest.raises(ValueError, match="cls torchscript: not offered"):
        export(LunaModel(), "torchscript", "x")


def test_onnx_round_trip_dynamic_shapes(model, slices, tmp_path):
    from nodulekit.deploy.runtime import OnnxRunner

    art = export(model, "onnx", tmp_path, variant="baseline")
    assert isinstance(art, Artifact) and art.path.endswith("model.onnx") and art.size_bytes > 0
    assert art.opset <= 19 and art.quantization == "fp32"
    assert not list(tmp_path.glob("*.data"))  # one file, no external weights
    with torch.no_grad():
        ref = model(torch.from_numpy(slices)).numpy()
    got = OnnxRunner(art.path)(slices)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4


def test_onnx_static_shape(model, tmp_path):
    art = export(model, "onnx", tmp_path / "static.onnx", dynamic=False, input_shape=(1, 7, 64, 64))
    dims = onnx.load(art.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 7, 64, 64]


def test_torchscript_round_trip_from_checkpoint(model, slices, tmp_path):
    save_seg_checkpoint(tmp_path / "seg.pt", model)
    art = export(tmp_path / "seg.pt", "torchscript", tmp_path / "out")
    loaded = torch.jit.load(art.path)
    with torch.no_grad():
        ref = model(torch.from_numpy(slices))
        got = loaded(torch.from_numpy(slices))
    assert (got - ref).abs().max().item() <= 1e-6


def test_onnx_int8_ptq(model, slices, tmp_path):
    from nodulekit.deploy.runtime import OnnxRunner

    art = export(model, "onnx-int8", tmp_path, calibration=slices, method="minmax")
    assert art.path.endswith("model.int8.onnx") and art.quantization == "int8-qdq"
    ops = {n.op_type for n in onnx.load(art.path).graph.node}
    assert "DequantizeLinear" in ops and art.opset <= 19
    fp32 = export(model, "onnx", tmp_path / "fp32.onnx")
    # int8 weights plus their scales: well under a third of the fp32 weight bytes
    assert weight_memory_bytes(art.path) < weight_memory_bytes(fp32.path) / 3
    assert param_count(art.path) == param_count(fp32.path)
    assert OnnxRunner(art.path)(slices).shape == (2, 1, 64, 96)


def test_rknn_row_delegates_lazily(model, tmp_path, monkeypatch):
    import sys
    import types

    calls = {}

    def fake_build_rknn(onnx_path, out_path, *, quantize, dataset, algorithm, input_size, target="rk3588"):
        calls.update(onnx=onnx_path, quantize=quantize, target=target, input_size=input_size)
        open(out_path, "wb").write(b"RKNN")
        return {"weight_memory_kib": 1.0}

    monkeypatch.setitem(sys.modules, "nodulekit.deploy.rknn", types.SimpleNamespace(build_rknn=fake_build_rknn))
    art = export(model, "rknn", tmp_path)
    assert art.format == "rknn" and art.path.endswith(".rknn") and art.quantization == "fp16"
    assert art.input_shape == [1, 7, 512, 512] and calls["target"] == "rk3588" and not calls["quantize"]
    art = export(model, "rknn-int8", tmp_path, dataset=["calib.npy"])
    assert art.path.endswith(".int8.rknn") and art.quantization == "int8" and calls["quantize"]


def test_empty_output_is_an_error(model, tmp_path, monkeypatch):
    from nodulekit.deploy import export as E

    monkeypatch.setitem(E.FORMATS, ("seg", "onnx"), E.Format("seg", "onnx", ".onnx", lambda m, out, **k: {}, "ort", ""))
    with pytest.raises(InputError, match="empty or no file"):
        export(model, "onnx", tmp_path)


def _handmade_qdq() -> onnx.ModelProto:
    """Conv with int8 weights (4x2x3x3, per-channel scales), an int32 bias, an fp32 BN, and
    activation Q/DQ scalars that must not count."""
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.int8), "w_q")
    w_scale = numpy_helper.from_array(np.full(4, 0.1, np.float32), "w_scale")
    w_zp = numpy_helper.from_array(np.zeros(4, np.int8), "w_zp")
    b = numpy_helper.from_array(np.zeros(4, np.int32), "b_q")
    b_scale = numpy_helper.from_array(np.full(4, 0.01, np.float32), "b_scale")
    a_scale = numpy_helper.from_array(np.array(0.05, np.float32), "a_scale")
    a_zp = numpy_helper.from_array(np.array(128, np.uint8), "a_zp")
    bn = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("g", "beta", "mean", "var")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b"], axis=0),
        helper.make_node("Conv", ["xd", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [w, w_scale, w_zp, b, b_scale, a_scale, a_zp, *bn])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weight_memory_accounting_on_handmade_onnx(tmp_path):
    model = _handmade_qdq()
    # weights 72 x int8 + scales 4 x fp32 + zero points 4 x int8 + bias 4 x int32 + bias scales 4 x fp32
    # + BN 4 x 4 x fp32; the activation scale/zero point are not weights
    expected = 72 + 16 + 4 + 16 + 16 + 64
    assert weight_memory_bytes(model) == expected
    onnx.save(model, tmp_path / "m.onnx")
    assert weight_memory_bytes(tmp_path / "m.onnx") == expected
    assert param_count(model) == 72 + 4 + 16


def test_export_cli(model, tmp_path, capsys):
    import json

    from nodulekit.cli import main

    save_seg_checkpoint(tmp_path / "seg.pt", model)
    assert main(["export", str(tmp_path / "seg.pt"), "-f", "onnx", "torchscript", "--out", str(tmp_path / "o")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [a["format"] for a in lines] == ["onnx", "torchscript"]
    assert all(a["size_bytes"] > 0 for a in lines)


def test_rknn_int8_cli_refuses_calibration_slices_of_another_size(synth_data, tmp_path, capsys):
    from nodulekit.cli import main
    from nodulekit.models.checkpoint import save_seg_checkpoint
    from nodulekit.models.unet import SegModel

    ckpt = save_seg_checkpoint(tmp_path / "seg.pt", SegModel())
    rc = main(["export", str(ckpt), "--format", "rknn", "--rknn-dtype", "int8", "--data", str(synth_data),
               "--calib-slices", "2", "--out", str(tmp_path / "out")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "rknn int8 calibration needs slices of the deployed input (1, 7, 512, 512)" in err
    assert "(1, 7, 256, 256)" in err


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    m = LunaModel(widths=[(4, 4), (8, 8), (8, 16), (16, 16)], crop=(16, 32, 32), crop_spacing=(1.25, 0.8, 0.8)).eval()
    torch.nn.init.normal_(m.head_linear.weight, std=0.05)  # a fresh head is zero: outputs would not
    torch.nn.init.normal_(m.head_linear.bias, std=0.05)  # depend on the input
    m.tail_batchnorm.running_mean.fill_(-350.0)
    m.tail_batchnorm.running_var.fill_(420.0 ** 2)
    return m


def test_export_cli_classifier(classifier, tmp_path, capsys, monkeypatch):
    """``nodulekit export`` reads the kind off a classifier checkpoint and writes the classifier
    study's forms: the 3D ONNX and the int8 ONNX of the Conv2d rewrite, both reloaded and compared
    with PyTorch on the same crops."""
    import json

    from nodulekit.cli import export as cli_export
    from nodulekit.cli import main
    from nodulekit.deploy.runtime import OnnxRunner, load_cls_runner
    from nodulekit.models.checkpoint import save_cls_checkpoint

    rng = np.random.default_rng(0)
    crops = rng.uniform(-1000, 1000, size=(8, 1, 16, 32, 32)).astype(np.float32)
    monkeypatch.setattr(cli_export, "_calibration", lambda args, kind, model, fmt: crops)
    save_cls_checkpoint(tmp_path / "cls.pt", classifier)
    out = tmp_path / "o"
    assert main(["export", str(tmp_path / "cls.pt"), "-f", "onnx", "onnx-int8", "--out", str(out),
                 "--data", "unused"]) == 0
    arts = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(a["kind"], a["format"], a["quantization"]) for a in arts] == [
        ("cls", "onnx", "fp32"), ("cls", "onnx-int8", "int8-qdq")]
    assert arts[0]["path"] == str(out / "cls3d.onnx") and arts[1]["path"] == str(out / "cls2d.int8.onnx")
    with torch.no_grad():
        ref_logits, ref_probs = (t.numpy() for t in classifier(torch.from_numpy(crops)))
    # fp32: ONNX Runtime agrees with PyTorch to float rounding
    assert np.abs(OnnxRunner(arts[0]["path"])(crops) - ref_logits).max() <= 1e-4
    runner = load_cls_runner(arts[0]["path"])
    assert runner.crop_spacing == (1.25, 0.8, 0.8)
    assert np.abs(runner(crops) - ref_probs[:, 1]).max() <= 1e-5
    # int8: the rewrite's logits within a few quantization steps of the float ones
    got = OnnxRunner(arts[1]["path"])(crops).reshape(len(crops), -1)
    assert np.abs(got - ref_logits).max() <= 0.1 * max(1.0, np.abs(ref_logits).max())
    assert load_cls_runner(arts[1]["path"]).crop_spacing == (1.25, 0.8, 0.8)


def test_export_cli_refuses_a_combination_the_table_lacks(classifier, tmp_path, capsys):
    from nodulekit.cli import main
    from nodulekit.models.checkpoint import save_cls_checkpoint

    save_cls_checkpoint(tmp_path / "cls.pt", classifier)
    assert main(["export", str(tmp_path / "cls.pt"), "-f", "onnx", "torchscript", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cls.pt" in err[0] and "not offered" in err[0] and "internal error" not in err[0]
    assert not (tmp_path / "o").exists()  # checked before anything is written


@pytest.mark.slow
def test_export_cli_classifier_rknn(classifier, tmp_path, capsys):
    """The classifier's NPU file through the CLI: the Conv2d rewrite built in fp16 by rknn-toolkit2,
    with the crop spacing in its sidecar; the simulator's logits agree with PyTorch to fp16 rounding."""
    import json
    import os

    from nodulekit.cli import main
    from nodulekit.deploy import rknn
    from nodulekit.deploy.model_meta import crop_spacing_of
    from nodulekit.models.checkpoint import save_cls_checkpoint

    if os.environ.get("NODULEKIT_SKIP_RKNN") == "1":
        pytest.skip("NODULEKIT_SKIP_RKNN=1")
    if not rknn.rknn_available():
        pytest.fail("the rknn-toolkit2 environment .venv-rknn is missing: run `make rknn`")
    save_cls_checkpoint(tmp_path / "cls.pt", classifier)
    assert main(["export", str(tmp_path / "cls.pt"), "-f", "rknn", "--out", str(tmp_path / "o")]) == 0
    (art,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert art["path"] == str(tmp_path / "o" / "cls2d.rknn") and art["quantization"] == "fp16"
    assert art["extra"]["rknn"]["cpu_fallback_layers"] == []  # the rewrite runs wholly on the NPU
    assert crop_spacing_of(art["path"]) == (1.25, 0.8, 0.8)
    from nodulekit.deploy.export import export

    x = np.random.default_rng(0).uniform(-1000, 1000, size=(1, 1, 16, 32, 32)).astype(np.float32)
    built = export(classifier, "rknn", tmp_path / "again.rknn", eval_inputs=[x]).extra["rknn"]
    with torch.no_grad():
        ref = classifier(torch.from_numpy(x))[0].numpy()
    logits = built["outputs"][0][0].reshape(ref.shape)
    assert np.abs(logits - ref).max() <= 1e-2 * max(1.0, np.abs(ref).max())  # fp16 on the NPU
