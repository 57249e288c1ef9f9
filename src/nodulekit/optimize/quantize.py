"""int8 quantization: static PTQ in ONNX Runtime, and QAT with torchao PT2E.

Both produce the same deployed form, a QDQ ONNX file: per-channel symmetric int8 weights and
per-tensor uint8 activations at the inputs of the convs, with the input BatchNorm and the final
Sigmoid left in float. Keeping the last conv's output (the logits) in float matters for recall: the
0.5 threshold sits at logit 0, exactly where a uint8 grid over a wide logit range is coarsest.

PTQ calibrates on :data:`CALIB_SLICES` whole training slices, half of them holding nodule voxels:
on a random slice a nodule is < 0.1 % of the pixels, so ranges calibrated on lung slices alone
clip the bright, rare activations a nodule produces. Percentile calibration (99.999 %) ignores the
extreme few values an uncalibrated MinMax would stretch the grid for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from nodulekit.log import get_logger

log = get_logger("optimize")

# 64 whole slices: ~16 M pixels per channel, enough for stable 99.999th percentiles
# (a few hundred values above the cut-off) while keeping calibration under a minute on 2 cores.
CALIB_SLICES = 64
CALIB_METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.999
CALIB_STRIDE = 4  # slices per calibration chunk: bounds the memory of histogram calibration
_CONVS = {torch.ops.aten.conv2d.default, torch.ops.aten.conv_transpose2d.input}
_BATCH_NORMS = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
                torch.ops.aten._native_batch_norm_legit_no_training.default}


def calibration_items(scans, n: int = CALIB_SLICES, nodule_share: float = 0.5, seed: int = 0):
    """Pick ``n`` ``(scan index, slice)`` pairs: ``nodule_share`` of them hold nodule voxels, the
    rest are spread evenly through each scan (lungs, mediastinum, abdomen)."""
    rng = np.random.default_rng(seed)
    positives = [(s, z) for s, scan in enumerate(scans) for z in sorted(scan.label_slices)]
    n_pos = min(len(positives), int(round(n * nodule_share)))
    picked = [positives[i] for i in sorted(rng.choice(len(positives), n_pos, replace=False))] if n_pos else []
    n_rest = n - n_pos
    per_scan = [n_rest // len(scans) + (i < n_rest % len(scans)) for i in range(len(scans))]
    for s, (scan, k) in enumerate(zip(scans, per_scan)):
        if k:
            zs = np.linspace(0, scan.shape[0] - 1, k + 2)[1:-1].round().astype(int)
            picked += [(s, int(z)) for z in zs]
    return picked


class SliceReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over whole 7-channel slices.

    Args:
        source: a list of ``(scan index, slice)`` with their ``scans``, or an array ``(N, 7, H, W)``.
        scans: the :class:`SegScan` list the indices refer to.
        input_name: the ONNX input name.
    """

    def __init__(self, source, scans=None, input_name: str = "x"):
        self.source, self.scans, self.input_name = source, scans, input_name
        self._i, self._end = 0, len(source)

    def __len__(self) -> int:
        return len(self.source)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only ``source[start_index:end_index]`` (ORT's strided calibration)."""
        self._i, self._end = start_index, min(end_index, len(self.source))

    def get_next(self):
        if self._i >= self._end:
            return None
        item = self.source[self._i]
        self._i += 1
        if self.scans is not None:
            s, z = item
            item = self.scans[s].context(z)
        return {self.input_name: np.ascontiguousarray(item, dtype=np.float32)[None]}

    def rewind(self):
        self._i, self._end = 0, len(self.source)


def _as_reader(calibration, input_name: str) -> SliceReader:
    if isinstance(calibration, SliceReader):
        calibration.input_name = input_name
        return calibration
    if isinstance(calibration, tuple) and len(calibration) == 2:
        return SliceReader(calibration[0], calibration[1], input_name)
    return SliceReader(np.asarray(calibration, dtype=np.float32), None, input_name)


def _stride(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` not above ``at_most`` (ORT needs the chunks to divide the data)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def quantize_onnx_static(src: str | Path, out: str | Path, calibration, *, method: str = "percentile") -> dict:
    """Static int8 QDQ quantization of an fp32 ONNX file with ONNX Runtime.

    Args:
        src: fp32 ONNX.
        out: QDQ ONNX to write (one file).
        calibration: a :class:`SliceReader`, ``(items, scans)``, or an array ``(N, 7, H, W)``.
        method: ``minmax``, ``percentile`` or ``entropy``.

    Returns:
        The settings used (method, slices, formats) for the report.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    model = onnx.load(str(src))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    graph_out = {o.name for o in model.graph.output}
    producers = {o: n for n in model.graph.node for o in n.output}
    # the conv feeding the output Sigmoid stays float (see the module docstring)
    last = [producers[n.input[0]].name for n in model.graph.node
            if n.op_type == "Sigmoid" and set(n.output) & graph_out and n.input[0] in producers]
    reader = _as_reader(calibration, model.graph.input[0].name)
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    extra = {"CalibPercentile": PERCENTILE} if method == "percentile" else {}
    # ORT's histogram calibrators keep every activation of every slice in memory (about 0.5 GB
    # per 512x512 slice for this U-Net); strided calibration merges the histograms every few slices
    extra["CalibStridedMinMax"] = _stride(len(reader), CALIB_STRIDE)
    quantize_static(
        str(src), str(out), reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "ConvTranspose"],
        nodes_to_exclude=last,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=calib,
        extra_options=extra,
    )
    log.info("PTQ: %s calibration on %d slices, %d convs quantized, float: %s", method, len(reader),
             len(convs) - len(last), last)
    return {"method": method, "slices": len(reader), "percentile": PERCENTILE if method == "percentile" else None,
            "weights": "int8 per-channel symmetric", "activations": "uint8 per-tensor", "float_nodes": last}


# ---------------------------------------------------------------------------------------------
# QAT (torchao PT2E)


def qat_prepare(model, size_multiple: int = 4, example_size: int = 64):
    """Export ``model`` with dynamic batch/H/W and insert fake-quant (torchao PT2E, QAT mode).

    X86InductorQuantizer's config is what ORT and RKNN run: per-channel symmetric int8 weights,
    per-tensor uint8 activations at conv inputs. It leaves ConvTranspose2d in float, so
    :class:`_ConvTransposeQuantizer` adds the same scheme there (as ORT's PTQ does). The returned
    GraphModule trains on crops and runs on whole slices; switch modes with :func:`set_train_mode`
    / :func:`set_eval_mode`.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    model = copy.deepcopy(model).cpu().train()
    example = torch.zeros(2, model.widths.in_channels, example_size, example_size)
    dims = {"x": {0: torch.export.Dim("batch", min=1, max=1024),
                  2: size_multiple * torch.export.Dim("h", min=2, max=4096 // size_multiple),
                  3: size_multiple * torch.export.Dim("w", min=2, max=4096 // size_multiple)}}
    graph = torch.export.export(model, (example,), dynamic_shapes=dims).module()
    config = get_default_x86_inductor_quantization_config(is_qat=True)
    quantizer = ComposableQuantizer([X86InductorQuantizer().set_global(config), _conv_transpose_quantizer(config),
                                     _npu_int8_quantizer(config)])
    with _without_conv_bn_folding(graph):
        return prepare_qat_pt2e(graph, quantizer)


def _conv_transpose_quantizer(config):
    """A PT2E quantizer for ``conv_transpose2d``: uint8 input as the convs, int8 weights per output
    channel (axis 1 of a transposed conv's ``(in, out, kH, kW)`` weight)."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, Quantizer, get_input_act_qspec,
                                                     get_weight_qspec)

    class _ConvTransposeQuantizer(Quantizer):
        def annotate(self, model):
            act = get_input_act_qspec(config)
            base = get_weight_qspec(config)
            # RKNN takes per-channel weight scales only along the output channels, axis 1 of a
            # transposed conv's weight. torchao drops the spec's ch_axis for fake-quant classes
            # without "PerChannel" in their name, and its fused fake-quant kernel only does axis 0,
            # so the plain FakeQuantize gets the axis in its own arguments.
            ctr = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=1,
                                         **{k: v for k, v in base.observer_or_fake_quant_ctr.p.keywords.items()
                                            if k not in ("observer", "ch_axis")})
            weight = dataclasses.replace(base, ch_axis=1, observer_or_fake_quant_ctr=ctr)
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target == torch.ops.aten.conv_transpose2d.input:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: act, node.args[1]: weight}, _annotated=True)
            return model

        def validate(self, model):
            pass

    return _ConvTransposeQuantizer()


def _npu_int8_quantizer(config):
    """Fake-quant where the x86 config leaves float tensors that an int8 NPU graph needs.

    dlwpt's blocks run conv -> ReLU -> BatchNorm. The x86 config quantizes conv inputs (the
    BatchNorm outputs) but not the ReLU outputs feeding the BatchNorms, nor the Sigmoid, so
    rknn-toolkit2 reads the exported QDQ graph as conv+ReLU, BatchNorm and conv+Sigmoid in fp16
    and inserts int8<->fp16 conversions around them. Quantizing the BatchNorm inputs (the model
    input for the first one) and the Sigmoid's input and output gives every layer int8 inputs and
    outputs, as ONNX Runtime's QDQ PTQ graph has (the last conv's output, the logit, gets uint8
    too: its step around the 0.5 threshold is a small fraction of a logit).
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer, get_input_act_qspec

    class _NpuInt8Quantizer(Quantizer):
        def annotate(self, model):
            act = get_input_act_qspec(config)
            for node in model.graph.nodes:
                if node.op != "call_function":
                    continue
                if node.target in _BATCH_NORMS and "quantization_annotation" not in node.meta:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: act}, _annotated=True)
                elif node.target == torch.ops.aten.sigmoid.default and "quantization_annotation" not in node.meta:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: act}, output_qspec=act, _annotated=True)
            return model

        def validate(self, model):
            pass

    return _NpuInt8Quantizer()


@contextlib.contextmanager
def _without_conv_bn_folding(graph):
    """Skip PT2E's conv-BatchNorm fusion passes when no conv feeds a BatchNorm.

    dlwpt's blocks run conv -> ReLU -> BatchNorm, so there is nothing to fuse, but the passes still
    trace ~100 candidate patterns through ``torch.export`` (over a minute on two cores).
    """
    from torchao.quantization.pt2e import quantize_pt2e

    conv_bn = any(n.target in _CONVS and any(u.target in _BATCH_NORMS for u in n.users) for n in graph.graph.nodes)
    if conv_bn:
        yield
        return
    with mock.patch.object(quantize_pt2e, "_fuse_conv_bn_qat", lambda m: m), \
            mock.patch.object(quantize_pt2e, "_fold_conv_bn_qat", lambda m: m):
        yield


def set_train_mode(graph):
    from torchao.quantization.pt2e import move_exported_model_to_train

    move_exported_model_to_train(graph)
    return graph


def set_eval_mode(graph):
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(graph)
    return graph


def qat_convert(prepared):
    """Fold the learnt ranges into quantize/dequantize ops with int8 weight constants (a copy:
    the fake-quant model stays usable for comparison)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = copy.deepcopy(prepared)
    set_eval_mode(prepared)
    with _without_conv_bn_folding(prepared):
        return convert_pt2e(prepared, fold_quantize=True)
