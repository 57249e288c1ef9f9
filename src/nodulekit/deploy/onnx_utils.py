"""Facts read off an ONNX file: weight memory and parameter count.

Weight memory is what the weights take in the deployed format, counted from the stored tensors:

* every initializer (and ``Constant`` node) at its stored element size: fp32 weights x4, int8
  weights x1, int32 biases x4;
* the scales and zero points of *weight* quantization (``DequantizeLinear`` whose input is a stored
  tensor) are counted, because a runtime must keep them next to the int8 weights;
* the scales and zero points of *activation* quantization (``QuantizeLinear``/``DequantizeLinear``
  on a computed tensor) are not weights: they are a handful of scalars per layer, and an NPU
  compiles them into its requantization parameters.

Shape helpers (the ``Shape``/``Reshape`` integer constants a dynamic-shape export may carry) are
excluded too: they are not parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_SHAPE_CONSUMERS = {"Reshape", "Expand", "Tile", "Slice", "Resize", "ConstantOfShape", "Squeeze", "Unsqueeze",
                    "Gather", "Concat", "Pad", "Range"}


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path))
    return model_or_path


def _stored_tensors(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = numpy_helper.to_array(attr.t)
    return tensors


def weight_tensors(model_or_path) -> dict[str, np.ndarray]:
    """Stored tensors that count as weights (see the module docstring), by name."""
    model = _load(model_or_path)
    tensors = _stored_tensors(model)
    consumers: dict[str, list[tuple[str, int, str]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, i, node.input[0] if node.input else ""))
    weights = {}
    for name, arr in tensors.items():
        uses = consumers.get(name, [])
        if not uses:
            continue
        activation_qparam = all(op in _QDQ and i > 0 and x not in tensors for op, i, x in uses)
        shape_helper = arr.dtype == np.int64 and all(op in _SHAPE_CONSUMERS for op, _, _ in uses)
        if activation_qparam or shape_helper:
            continue
        weights[name] = arr
    return weights


def weight_memory_bytes(model_or_path) -> int:
    """Bytes the weights take in this ONNX file (module docstring: what counts)."""
    return int(sum(a.nbytes for a in weight_tensors(model_or_path).values()))


def param_count(model_or_path) -> int:
    """Elements of the stored weights, quantization scales and zero points excluded."""
    model = _load(model_or_path)
    weights = weight_tensors(model)
    qparams = {name for node in model.graph.node if node.op_type in _QDQ for name in node.input[1:]}
    return int(sum(a.size for name, a in weights.items() if name not in qparams))
