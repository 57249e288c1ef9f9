"""Quantization-aware training with torchao PT2E.

QAT produces the same deployed form as ONNX Runtime's static PTQ (:mod:`nodulekit.deploy.ptq`), a
QDQ ONNX file: per-channel symmetric int8 weights and per-tensor uint8 activations at the inputs of
the convs; here the ranges are learnt while the model trains with fake quantization.

Why torchao and not NNCF's QAT: the QDQ graph must come out as plain ONNX QuantizeLinear /
DequantizeLinear pairs placed where rknn-toolkit2 reads them (docs/rknn.md), and the PT2E graph
exports them as such; NNCF's QAT trains its own wrapped model for OpenVINO's FakeQuantize. NNCF
quantizes where OpenVINO runs the result (:mod:`nodulekit.deploy.openvino`, post-training).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from nodulekit.log import get_logger

log = get_logger("optimize")

_CONVS = {torch.ops.aten.conv2d.default, torch.ops.aten.conv_transpose2d.input}
_BATCH_NORMS = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
                torch.ops.aten._native_batch_norm_legit_no_training.default}


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
    the fake-quant model stays usable for comparison).

    These are the steps of torchao's ``convert_pt2e`` (reference decomposition, duplicated-DQ and
    node-meta passes, constant folding of the weight quantization, train/eval lock) without its QAT
    conv-BatchNorm fold, for which ``convert_pt2e`` has no switch: dlwpt's blocks run conv -> ReLU
    -> BatchNorm, so the fold finds nothing, yet it traces every conv/BatchNorm pattern it knows
    through ``torch.export`` (most of the conversion's time) and, by removing the BatchNorms' batch
    counters, renumbers the exported ONNX graph (its file size changes though nothing else does).
    Running the steps here keeps the library unpatched (torchao is pinned, since these are its
    private functions); a model whose convs do feed BatchNorms gets ``convert_pt2e`` itself.
    """
    from torch.fx.passes.infra.pass_manager import PassManager
    from torchao.quantization.pt2e.constant_fold import constant_fold
    from torchao.quantization.pt2e.convert import _convert_to_reference_decomposed_fx
    from torchao.quantization.pt2e.quantize_pt2e import _quant_node_constraint
    from torchao.quantization.pt2e.quantizer import DuplicateDQPass, PortNodeMetaForQDQ
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    from torchao.quantization.pt2e.utils import _disallow_eval_train

    prepared = copy.deepcopy(prepared)
    set_eval_mode(prepared)
    if any(n.target in _CONVS and any(u.target in _BATCH_NORMS for u in n.users) for n in prepared.graph.nodes):
        return convert_pt2e(prepared, fold_quantize=True)  # a conv feeds a BatchNorm: fold it
    meta = prepared.meta
    model = _convert_to_reference_decomposed_fx(prepared)
    model = PassManager([DuplicateDQPass()])(model).graph_module
    model = PassManager([PortNodeMetaForQDQ()])(model).graph_module
    constant_fold(model, _quant_node_constraint)
    model.meta.update(meta)
    return _disallow_eval_train(model)
