"""The classifier's Conv2d rewrite: same function, NPU-only operators, runners, study rows."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from nodulekit.models.classifier import LunaModel
from nodulekit.models.cls2d import conv_macs, to_conv2d

NPU_OPS = {"Conv", "Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Gemm", "MatMul", "Add", "Mul",
           "Softmax", "Constant", "Identity"}


def _model(crop=(32, 48, 48), widths=None, seed=0) -> LunaModel:
    torch.manual_seed(seed)
    m = LunaModel(widths=widths, crop=crop).eval()
    torch.nn.init.normal_(m.head_linear.weight, std=0.05)  # a fresh head is zero: the logits would not
    torch.nn.init.normal_(m.head_linear.bias, std=0.05)  # depend on the input
    bn = m.tail_batchnorm
    bn.running_mean.fill_(-350.0)
    bn.running_var.fill_(420.0**2)
    bn.weight.data.fill_(1.7)
    bn.bias.data.fill_(-0.3)
    return m


def export_cls_onnx(model, out) -> str:
    from nodulekit.deploy.export import export

    return export(model, "onnx", out, kind="cls").path


def _crops(n, crop, seed=1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1000, 1000, (n, 1, *crop)).astype(np.float32))


@pytest.mark.parametrize("crop, widths", [
    ((32, 48, 48), None),
    ((16, 32, 32), [(4, 4), (8, 8), (8, 16), (16, 16)]),
])
def test_conv2d_rewrite_is_exact(crop, widths):
    m = _model(crop, widths)
    c = to_conv2d(m)
    x = _crops(3, crop)
    with torch.no_grad():
        (a, pa), (b, pb) = m(x), c(x)
    assert a.shape == b.shape == (3, 2)
    assert (a - b).abs().max().item() <= 1e-4
    assert torch.allclose(pa, pb, atol=1e-5)


def test_conv2d_rewrite_exports_npu_ops_only(tmp_path):
    import onnx


    m = _model((16, 32, 32), [(4, 4), (8, 8), (8, 16), (16, 16)])
    path = export_cls_onnx(to_conv2d(m), tmp_path / "c2d.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert set(ops) <= NPU_OPS, ops
    assert "Conv" in ops and ops["Conv"] == 17  # 8 banded convs + 2 grouped 1x1 per depth pool + the head
    # one Reshape folds the 5D input; none at the outputs
    assert ops["Reshape"] == 1 and "Flatten" not in ops and "Gemm" not in ops
    outputs = onnx.load(str(path)).graph.output
    assert [d.dim_value for d in outputs[0].type.tensor_type.shape.dim] == [1, 2, 1, 1]


def test_onnx_runner_runs_the_rewrite(tmp_path):
    from nodulekit.deploy.runtime import load_cls_runner

    m = _model()
    path = export_cls_onnx(to_conv2d(m), tmp_path / "c2d.onnx")
    runner = load_cls_runner(path, backend="onnx")
    x = _crops(2, m.crop)
    probs = np.concatenate([runner(x[i:i + 1].numpy()) for i in range(2)])
    with torch.no_grad():
        ref = m(x)[1][:, 1].numpy()
    assert probs.shape == (2,) and np.allclose(probs, ref, atol=1e-4)


def test_sizes_and_macs():
    m = _model()
    c = to_conv2d(m)
    n3, n2 = (sum(p.numel() for p in mod.parameters()) for mod in (m, c))
    assert n2 > 10 * n3  # the depth band costs weights
    assert conv_macs(c) > 5 * conv_macs(m)


def test_auc():
    from nodulekit.optimize.classifier import auc

    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.5, 0.5], [0, 1]) == 0.5
    assert np.isnan(auc([0.1, 0.2], [0, 0]))


def test_f1_at_probability_half():
    from nodulekit.optimize.classifier import _f1

    logits = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # predicted: nodule, not, nodule
    assert _f1(logits, [1, 0, 0]) == pytest.approx(2 / 3)
    assert _f1(logits, [1, 0, 1]) == 1.0
    assert np.isnan(_f1(logits[1:2], [0]))


def test_classifier_study_rows(tmp_path):
    from nodulekit.models.checkpoint import save_cls_checkpoint
    from nodulekit.optimize.classifier import classifier_study

    m = _model((16, 32, 32), [(4, 4), (8, 8), (8, 16), (16, 16)])
    ckpt = save_cls_checkpoint(tmp_path / "cls.pt", m)
    crops = _crops(12, m.crop).numpy()
    labels = np.array([0, 1] * 6)
    rows = classifier_study(ckpt, None, tmp_path / "out", rknn=False, crops=crops, labels=labels)
    by = {r["name"]: r for r in rows}
    assert set(by) == {"cls3d_onnx_fp32", "cls2d_onnx_fp32", "cls2d_onnx_int8"}
    assert all("error" not in r for r in rows), rows
    assert by["cls2d_onnx_fp32"]["max_abs_diff_vs_3d"] <= 1e-4
    assert by["cls3d_onnx_fp32"]["latency_us"] > 0 and 0 <= by["cls2d_onnx_int8"]["auc"] <= 1
    assert all(r["f1"] is not None and (np.isnan(r["f1"]) or 0 <= r["f1"] <= 1) for r in rows)
    # the common row schema, with ratios against the 3D ONNX row
    assert all(r["kind"] == "cls" and (tmp_path / "out" / os.path.basename(r["artifact"])).is_file() for r in rows)
    assert [r["format"] for r in rows] == ["onnx", "onnx", "onnx-int8"]
    assert by["cls3d_onnx_fp32"]["weight_memory_ratio"] == 1.0 and by["cls2d_onnx_int8"]["quantization"] == "int8-qdq"


@pytest.mark.slow
@pytest.mark.parametrize("context", [None, 2.5])
def test_rknn_runs_the_rewrite_on_the_npu(tmp_path, context):
    from nodulekit.deploy import rknn

    if os.environ.get("NODULEKIT_SKIP_RKNN") == "1":
        pytest.skip("NODULEKIT_SKIP_RKNN=1")
    if not rknn.rknn_available():
        pytest.fail("the rknn-toolkit2 environment .venv-rknn is missing: run `make rknn`")
    m = _model((16, 32, 32), [(4, 4), (8, 8), (8, 16), (16, 16)]) if context is None else _context_model()
    path = export_cls_onnx(to_conv2d(m), tmp_path / "c2d.onnx")
    x = np.random.default_rng(1).uniform(-1000, 1000, (1, m.in_channels, *m.crop)).astype(np.float32)
    info = rknn.build_rknn(path, tmp_path / "c2d.rknn", quantize=False, input_size=x.shape, eval_inputs=[x])
    # 4D outputs: nothing is left to the CPU
    assert info["cpu_fallback_layers"] == []
    assert all(r["target"] == "NPU" for r in info["layers"] if r["op_type"].startswith(("Conv", "MaxPool", "Add", "Relu")))
    with torch.no_grad():
        ref = m(torch.from_numpy(x))[0].numpy()
    logits = info["outputs"][0][0].reshape(ref.shape)
    assert np.abs(logits - ref).max() <= 1e-2 * max(1.0, np.abs(ref).max())  # fp16 on the NPU


def test_exported_classifier_carries_its_crop_spacing(tmp_path):
    """ONNX files keep the crop spacing in their metadata, .rknn files in a sidecar, and the
    runners hand it to detection; a file without it means native voxels."""
    from nodulekit.deploy.model_meta import crop_spacing_of, write_model_meta
    from nodulekit.deploy.runtime import load_cls_runner

    m = _model()
    m.crop_spacing = (1.25, 0.8, 0.8)
    p3 = export_cls_onnx(m, tmp_path / "c3d.onnx")
    p2 = export_cls_onnx(to_conv2d(m), tmp_path / "c2d.onnx")
    assert load_cls_runner(p3, backend="onnx").crop_spacing == (1.25, 0.8, 0.8)
    assert crop_spacing_of(p2) == (1.25, 0.8, 0.8)
    rk = tmp_path / "c.rknn"
    rk.write_bytes(b"")
    assert crop_spacing_of(rk) is None
    write_model_meta(rk, {"crop_spacing_mm": [1.0, 0.7, 0.7]})
    assert crop_spacing_of(rk) == (1.0, 0.7, 0.7)
    native = export_cls_onnx(_model(), tmp_path / "native.onnx")
    assert load_cls_runner(native, backend="onnx").crop_spacing is None


def _context_model(crop=(16, 32, 32), widths=((4, 4), (8, 8), (8, 16), (16, 16))) -> LunaModel:
    torch.manual_seed(0)
    m = LunaModel(widths=list(widths), crop=crop, crop_spacing=(1.25, 0.8, 0.8), context=2.5).eval()
    torch.nn.init.normal_(m.head_linear.weight, std=0.05)
    bn = m.tail_batchnorm
    bn.running_mean.copy_(torch.tensor([-350.0, -600.0]))
    bn.running_var.copy_(torch.tensor([420.0, 300.0]) ** 2)
    bn.weight.data.copy_(torch.tensor([1.7, 0.8]))
    bn.bias.data.copy_(torch.tensor([-0.3, 0.2]))
    return m


def test_a_context_classifier_takes_two_channels_through_every_form(tmp_path):
    """The rewrite folds the two channels with a plain reshape and stays exact; the exported file
    says which crops to cut, and the ONNX runners of both forms give the model's probabilities."""
    import onnx

    from nodulekit.deploy.model_meta import context_of
    from nodulekit.deploy.runtime import load_cls_runner
    from nodulekit.models.checkpoint import load_cls_model, save_cls_checkpoint

    m = _context_model()
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1000, 1000, (3, 2, *m.crop)).astype(np.float32))
    c = to_conv2d(m)
    with torch.no_grad():
        (a, pa), (b, _) = m(x), c(x)
    assert (a - b).abs().max().item() <= 1e-4
    # the channels matter: swapping them changes the logits
    with torch.no_grad():
        assert (m(x.flip(1))[0] - a).abs().max().item() > 1e-3
    p2 = export_cls_onnx(c, tmp_path / "c2d.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(p2)).graph.node)
    assert set(ops) <= NPU_OPS and ops["Reshape"] == 1, ops
    for path in (export_cls_onnx(m, tmp_path / "c3d.onnx"), p2):
        runner = load_cls_runner(path, backend="onnx")
        assert (runner.context, runner.crop_spacing, context_of(path)) == (2.5, (1.25, 0.8, 0.8), 2.5)
        probs = np.concatenate([runner(x[i:i + 1].numpy()) for i in range(3)])
        assert np.allclose(probs, pa[:, 1].numpy(), atol=1e-4)
    back, ckpt = load_cls_model(save_cls_checkpoint(tmp_path / "cls.pt", m))
    assert (back.context, back.in_channels, ckpt["context"]) == (2.5, 2, 2.5)
    assert conv_macs(m, (1, 2, *m.crop)) > conv_macs(_model(m.crop, [(4, 4), (8, 8), (8, 16), (16, 16)]), (1, 1, *m.crop))


def test_a_checkpoint_whose_context_disagrees_with_its_weights_is_refused(tmp_path):
    from nodulekit.errors import InputError
    from nodulekit.models.checkpoint import load_cls_model, save_cls_checkpoint

    path = save_cls_checkpoint(tmp_path / "cls.pt", _context_model())
    ckpt = torch.load(path, weights_only=True)
    for context, message in ((None, "2 channel"), (0.5, "context field")):
        torch.save({**ckpt, "context": context}, tmp_path / "bad.pt")
        with pytest.raises(InputError, match=message):
            load_cls_model(tmp_path / "bad.pt")
