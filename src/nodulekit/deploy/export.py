"""Exporter: one function per format, a formats table as data, one wrapper that times and checks.

=============  ============  =====================================================================
format         file          what
=============  ============  =====================================================================
onnx           .onnx         fp32, opset 17, one file, dynamic batch and H/W (or static)
onnx-int8      .int8.onnx    QDQ int8: ORT static quantization of the fp32 graph, or a QAT model's
                             own quantize/dequantize nodes
torchscript    .ts           ``torch.jit.trace`` of a float model
rknn           .rknn         RK3588 NPU model built from a static 1x7x512x512 ONNX export
=============  ============  =====================================================================

Every ``export_<fmt>`` returns the path it wrote plus metadata; :func:`export` wraps it, checks the
file is not empty, logs path, size and time, and returns an :class:`Artifact`.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nodulekit import SEG_CHANNELS
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("deploy")

ONNX_OPSET = 17  # rknn-toolkit2 loads opsets 13-19; the dynamo exporter's default (20) is refused
DYNAMO_OPSET = 18
DEPLOY_SHAPE = (1, SEG_CHANNELS, 512, 512)


@dataclass
class Artifact:
    """An exported file and what it is."""

    path: str
    format: str
    variant: str
    input_shape: list
    opset: int | None
    quantization: str
    size_bytes: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_exported_graph(model) -> bool:
    # a PT2E (QAT) model is a GraphModule holding quantize/dequantize calls
    return isinstance(model, torch.fx.GraphModule)


def _size_multiple(model) -> int:
    widths = getattr(model, "widths", None)
    return 2 ** (widths.depth - 1) if widths is not None and hasattr(widths, "depth") else 4


def export_onnx(model, out: Path, *, input_shape=DEPLOY_SHAPE, dynamic: bool = True, opset: int | None = None) -> dict:
    """fp32 (or QAT-QDQ) ONNX, weights inside the one file.

    A float model goes through the TorchScript-based exporter at opset 17 (ten times faster than
    the dynamo exporter here, and what ORT's quantization tools handle best); a PT2E graph, which
    only the dynamo exporter reads, goes through it at opset 18 with ``external_data=False``.

    Args:
        model: a :class:`SegModel` or a PT2E-converted GraphModule.
        out: file to write.
        input_shape: example input; with ``dynamic=False`` the fixed input shape.
        dynamic: dynamic batch, height and width (multiples of the U-Net's down-sampling factor).
        opset: ONNX opset (<= 19 for rknn); default 17 (float) or 18 (PT2E graph).
    """
    example = torch.zeros(input_shape, dtype=torch.float32)
    graph = _is_exported_graph(model)
    if graph:
        opset = opset or DYNAMO_OPSET
        dynamic_shapes = None
        if dynamic:
            m = _size_multiple(model)
            dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024),
                                    2: m * torch.export.Dim("h", min=2, max=4096 // m),
                                    3: m * torch.export.Dim("w", min=2, max=4096 // m)}}
        with warnings.catch_warnings():
            # a PT2E graph keeps training=True; its ops were already switched to eval
            warnings.filterwarnings("ignore", message=".*training mode.*")
            torch.onnx.export(model, (example,), str(out), dynamo=True, opset_version=opset, external_data=False,
                              input_names=["x"], output_names=["prob"], dynamic_shapes=dynamic_shapes,
                              verbose=False)
        _strip_debug_info(out)
    else:
        opset = opset or ONNX_OPSET
        axes = {"x": {0: "batch", 2: "h", 3: "w"}, "prob": {0: "batch", 2: "h", 3: "w"}} if dynamic else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model.eval(), (example,), str(out), dynamo=False, opset_version=opset,
                              input_names=["x"], output_names=["prob"], dynamic_axes=axes)
    return {"opset": opset, "quantization": "int8-qdq" if graph else "fp32",
            "input_shape": list(input_shape) if not dynamic else ["batch", SEG_CHANNELS, "h", "w"]}


def _strip_debug_info(path: Path) -> None:
    """Drop the dynamo exporter's per-node source metadata and intermediate shapes: a third of a
    small U-Net's file, and nothing a runtime reads (ONNX Runtime infers the shapes again)."""
    import onnx

    model = onnx.load(str(path))
    del model.graph.value_info[:]
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    onnx.save(model, str(path))


def export_onnx_int8(model, out: Path, *, calibration=None, method: str = "percentile",
                     input_shape=DEPLOY_SHAPE, dynamic: bool = True, opset: int | None = None,
                     fp32_onnx: str | Path | None = None) -> dict:
    """QDQ int8 ONNX.

    A QAT model (PT2E GraphModule) already carries its quantize/dequantize nodes and is exported
    as is. A float model is exported to fp32 ONNX (or ``fp32_onnx`` is reused) and quantized by
    :func:`nodulekit.optimize.quantize.quantize_onnx_static` on ``calibration`` slices.
    """
    if _is_exported_graph(model):
        return export_onnx(model, out, input_shape=input_shape, dynamic=dynamic, opset=opset)
    from nodulekit.optimize.quantize import quantize_onnx_static

    if calibration is None:
        raise ValueError("onnx-int8 of a float model needs calibration slices")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(fp32_onnx) if fp32_onnx else Path(tmp) / "fp32.onnx"
        if not fp32_onnx:
            export_onnx(model, src, input_shape=input_shape, dynamic=dynamic, opset=opset)
        info = quantize_onnx_static(src, out, calibration, method=method)
    return {"opset": opset or ONNX_OPSET, "quantization": "int8-qdq", "calibration": info,
            "input_shape": list(input_shape) if not dynamic else ["batch", SEG_CHANNELS, "h", "w"]}


def export_torchscript(model, out: Path, *, input_shape=(1, SEG_CHANNELS, 64, 64)) -> dict:
    """Traced TorchScript of a float model (shapes stay dynamic: the U-Net has no shape logic)."""
    if _is_exported_graph(model):
        raise InputError(str(out), "torchscript export takes a float model, not a quantized graph")
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), torch.zeros(input_shape), check_trace=False)
    traced.save(str(out))
    return {"opset": None, "quantization": "fp32", "input_shape": ["batch", SEG_CHANNELS, "h", "w"]}


def export_rknn(model, out: Path, *, quantize: bool = True, dataset=None, algorithm: str = "normal",
                target: str = "rk3588", onnx_path: str | Path | None = None) -> dict:
    """RKNN model for the NPU, built from a static 1x7x512x512 ONNX export in ``.venv-rknn``.

    Args:
        quantize: int8 build (``True``) or fp16 (``False``; also for a QAT QDQ graph).
        dataset: calibration list file of ``.npy`` inputs for the int8 build.
        algorithm: rknn quantization algorithm (``normal``, ``kl_divergence``, ``mmse``).
        onnx_path: reuse this ONNX instead of exporting one.
    """
    from nodulekit.deploy.rknn import export_rknn as build_rknn

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(onnx_path) if onnx_path else Path(tmp) / "static.onnx"
        if not onnx_path:
            export_onnx(model, src, input_shape=DEPLOY_SHAPE, dynamic=False)
        info = build_rknn(src, out, quantize=quantize, dataset=dataset, algorithm=algorithm, target=target)
    return {"opset": None, "quantization": "int8" if quantize else "fp16",
            "input_shape": list(DEPLOY_SHAPE), "rknn": info}


@dataclass(frozen=True)
class Format:
    """One row of the formats table."""

    name: str
    suffix: str
    fn: Callable[..., dict]
    runtime: str
    description: str


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", ".onnx", export_onnx, "onnxruntime", "fp32 ONNX, opset 17, single file"),
    Format("onnx-int8", ".int8.onnx", export_onnx_int8, "onnxruntime", "int8 QDQ ONNX (per-channel weights)"),
    Format("torchscript", ".ts", export_torchscript, "torch", "traced TorchScript"),
    Format("rknn", ".rknn", export_rknn, "rknn", "RK3588 NPU model (rknn-toolkit2)"),
)}


def export(model_or_ckpt, fmt: str, out: str | Path, *, variant: str = "baseline", **kwargs) -> Artifact:
    """Export a model (or a checkpoint path) to one format.

    Args:
        model_or_ckpt: a :class:`SegModel`, a PT2E GraphModule, or a segmentation checkpoint path.
        fmt: a key of :data:`FORMATS`.
        out: output file, or a folder (then ``model<suffix>`` inside it).
        variant: the compression variant the model belongs to (kept in the metadata).
        **kwargs: passed to ``export_<fmt>``.

    Raises:
        InputError: the export wrote nothing.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    model = model_or_ckpt
    if isinstance(model_or_ckpt, (str, Path)):
        from nodulekit.models.checkpoint import load_seg_model

        model, _ = load_seg_model(model_or_ckpt)
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / f"model{spec.suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("export %s (%s) -> %s with torch %s", variant, fmt, out, torch.__version__)
    start = time.perf_counter()
    meta = spec.fn(model, out, **kwargs)
    seconds = time.perf_counter() - start
    if not out.is_file() or out.stat().st_size == 0:
        raise InputError(out, f"{fmt} export wrote an empty or no file")
    size = out.stat().st_size
    log.info("wrote %s (%.1f KiB) in %.1f s", out, size / 1024, seconds)
    extra = {k: v for k, v in meta.items() if k not in ("opset", "quantization", "input_shape")}
    return Artifact(path=str(out), format=fmt, variant=variant, input_shape=meta.get("input_shape"),
                    opset=meta.get("opset"), quantization=meta.get("quantization", "fp32"), size_bytes=size,
                    seconds=round(seconds, 3), extra=extra)
