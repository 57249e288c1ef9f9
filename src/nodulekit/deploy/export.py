"""The one exporter: a formats table keyed by (model kind, format), one function per entry, one
wrapper that checks and times.

===========  ==========  =====================================  ==================================
format       file        seg (the U-Net)                        cls (the nodule classifier)
===========  ==========  =====================================  ==================================
onnx         .onnx       fp32, opset 17, dynamic batch and H/W  fp32 3D model, static batch 1
onnx-int8    .int8.onnx  QDQ int8: ORT static PTQ of the fp32   QDQ int8 (ORT PTQ) of the Conv2d
                         graph, or a QAT graph's own Q/DQ       rewrite
torchscript  .ts         ``torch.jit.trace`` of a float model   not offered (see :data:`FORMATS`)
rknn         .rknn       fp16 NPU build of a static             fp16 NPU build of the Conv2d
                         1x7x512x512 export (a QAT graph keeps  rewrite (``conv2d=False``: the 3D
                         its own int8)                          model)
rknn-int8    .int8.rknn  toolkit int8 from calibration slices   toolkit int8 of the Conv2d rewrite
openvino     .xml        fp32 IR (+ .bin) of the fp32 ONNX,     fp32 IR of the 3D model, any batch
                         dynamic batch and H/W
openvino-    .int8.xml   NNCF int8 of that IR on the ORT PTQ's  NNCF int8 of the 3D model's IR
int8                     calibration slices
===========  ==========  =====================================  ==================================

Every ``export_*`` returns metadata; :func:`export` picks the table entry, writes the file, checks it
is not empty, logs path, size and time, and returns an :class:`Artifact`. A classifier file carries
its crop and crop spacing (:mod:`nodulekit.deploy.model_meta`), which its runners read.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nodulekit import CLS_CROP, SEG_CHANNELS
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
    kind: str = "seg"

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
    :func:`nodulekit.deploy.ptq.quantize_onnx_static` on ``calibration`` slices.
    """
    if _is_exported_graph(model):
        return export_onnx(model, out, input_shape=input_shape, dynamic=dynamic, opset=opset)
    from nodulekit.deploy.ptq import quantize_onnx_static

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


def export_rknn(model, out: Path, *, quantize: bool = False, dataset=None, algorithm: str = "normal",
                target: str = "rk3588", onnx_path: str | Path | None = None) -> dict:
    """RKNN model for the NPU, built from a static 1x7x512x512 ONNX export in ``.venv-rknn``.

    Args:
        quantize: int8 build by the toolkit (the ``rknn-int8`` entry), or fp16 (``rknn``; a QAT QDQ
            graph keeps its own int8).
        dataset: calibration list file of ``.npy`` inputs, or the input arrays, for the int8 build.
        algorithm: rknn quantization algorithm (``normal``, ``kl_divergence``, ``mmse``).
        onnx_path: reuse this ONNX instead of exporting one.
    """
    return _rknn(lambda src: export_onnx(model, src, input_shape=DEPLOY_SHAPE, dynamic=False), out,
                 onnx_path, DEPLOY_SHAPE, quantize=quantize, dataset=dataset, algorithm=algorithm, target=target)


def _rknn(write_onnx, out: Path, onnx_path, input_shape, *, quantize: bool, **build) -> dict:
    from nodulekit.deploy.rknn import build_rknn

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(onnx_path) if onnx_path else Path(tmp) / "static.onnx"
        if not onnx_path:
            write_onnx(src)
        info = build_rknn(src, out, quantize=quantize, input_size=tuple(input_shape), **build)
    return {"opset": None, "quantization": "int8" if quantize else "fp16", "input_shape": list(input_shape),
            "rknn": info}


# ---------------------------------------------------------------------------------------------
# the classifier


def cls_meta(model) -> dict:
    """The metadata a deployed classifier carries: its crop, crop spacing and context channel."""
    cs = getattr(model, "crop_spacing", None)
    return {"kind": "classifier", "crop": list(getattr(model, "crop", CLS_CROP)),
            "crop_spacing_mm": None if cs is None else list(cs), "context": getattr(model, "context", None)}


def _cls_form(model, conv2d: bool):
    """The model to export: the Conv2d rewrite of a 3D ``LunaModel`` when ``conv2d``, else itself
    (a model already rewritten is exported as it is)."""
    from nodulekit.models.classifier import LunaModel
    from nodulekit.models.cls2d import to_conv2d

    return to_conv2d(model) if conv2d and isinstance(model, LunaModel) else model


def _cls_shape(model) -> tuple[int, ...]:
    return (1, getattr(model, "in_channels", 1), *getattr(model, "crop", CLS_CROP))


def export_cls_onnx(model, out: Path, *, conv2d: bool = False) -> dict:
    """Static batch-1 ONNX (opset 17) with outputs ``logits`` and ``probs``, and the model's crop
    spacing in its metadata.

    ``conv2d`` exports the Conv2d rewrite (:func:`nodulekit.models.cls2d.to_conv2d`). A model with
    ``spatial_outputs`` (the rewrite) is exported with ``(1, 2, 1, 1)`` outputs, so that the NPU has
    no Reshape to leave to its CPU; the runners read both shapes.
    """
    from nodulekit.deploy.model_meta import write_model_meta

    source, model = model, _cls_form(model, conv2d)
    spatial = getattr(model, "spatial_outputs", None)
    if spatial is not None:
        model.spatial_outputs = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model.eval(), torch.zeros(_cls_shape(source)), str(out), input_names=["x"],
                              output_names=["logits", "probs"], opset_version=ONNX_OPSET, dynamo=False)
    finally:
        if spatial is not None:
            model.spatial_outputs = spatial
    write_model_meta(out, cls_meta(source))
    return {"opset": ONNX_OPSET, "quantization": "fp32", "input_shape": list(_cls_shape(source)),
            "conv2d": model is not source}


def export_cls_onnx_int8(model, out: Path, *, calibration, conv2d: bool = True,
                         fp32_onnx: str | Path | None = None) -> dict:
    """QDQ int8 ONNX of the classifier (by default its Conv2d rewrite), quantized by ONNX Runtime on
    ``calibration`` crops ``(N, 1, D, H, W)`` with MinMax ranges; ``fp32_onnx`` reuses an export."""
    from nodulekit.deploy.model_meta import write_model_meta
    from nodulekit.deploy.ptq import quantize_onnx_static

    if calibration is None:
        raise ValueError("onnx-int8 of a classifier needs calibration crops")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(fp32_onnx) if fp32_onnx else Path(tmp) / "fp32.onnx"
        if not fp32_onnx:
            export_cls_onnx(model, src, conv2d=conv2d)
        info = quantize_onnx_static(src, out, calibration, method="minmax", kind="cls")
    write_model_meta(out, cls_meta(model))
    return {"opset": ONNX_OPSET, "quantization": "int8-qdq", "calibration": info,
            "input_shape": list(_cls_shape(model)), "conv2d": conv2d}


def export_cls_rknn(model, out: Path, *, quantize: bool = False, conv2d: bool = True, dataset=None,
                    algorithm: str = "normal", target: str = "rk3588", onnx_path: str | Path | None = None,
                    eval_inputs=None) -> dict:
    """RKNN build of the classifier: its Conv2d rewrite (the NPU has no Conv3d) unless ``conv2d`` is
    False; fp16, or toolkit int8 (``quantize``) from ``dataset`` crops. ``eval_inputs`` crops run in
    the simulator; their outputs come back in ``["rknn"]["outputs"]``."""
    from nodulekit.deploy.model_meta import write_model_meta

    meta = _rknn(lambda src: export_cls_onnx(model, src, conv2d=conv2d), out, onnx_path, _cls_shape(model),
                 quantize=quantize, dataset=list(dataset) if quantize else None, algorithm=algorithm,
                 target=target, eval_inputs=eval_inputs)
    write_model_meta(out, cls_meta(model))
    return meta


def _int8(fn):
    """The int8 entry (``rknn-int8``, the classifier's ``openvino-int8``) of an exporter taking ``quantize``."""
    def export_int8(model, out: Path, **kwargs) -> dict:
        return fn(model, out, quantize=True, **kwargs)

    export_int8.__doc__ = f"{fn.__name__} with the toolkit's int8 quantization."
    return export_int8


def export_openvino(model, out: Path, *, onnx_path: str | Path | None = None, **onnx_kwargs) -> dict:
    """fp32 OpenVINO IR (``.xml`` + ``.bin``) of the segmentation U-Net, dynamic batch and H/W,
    converted from its fp32 ONNX (``onnx_path`` reuses one)."""
    from nodulekit.deploy.openvino import _ir_files, _save, convert_onnx

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(onnx_path) if onnx_path else Path(tmp) / "fp32.onnx"
        if not onnx_path:
            meta = export_onnx(model, src, **onnx_kwargs)
        _save(convert_onnx(src), out)
    return {"opset": None, "quantization": "fp32", "input_shape": ["batch", 7, "h", "w"],
            "files": [str(p) for p in _ir_files(out)], **({} if onnx_path else {"onnx_opset": meta["opset"]})}


def export_openvino_int8(model, out: Path, *, calibration=None, onnx_path: str | Path | None = None,
                         **onnx_kwargs) -> dict:
    """int8 OpenVINO IR of the U-Net: :func:`export_openvino`'s graph quantized by NNCF on
    ``calibration`` slices (the ONNX Runtime PTQ's)."""
    from nodulekit.deploy.openvino import _ir_files, _save, convert_onnx, quantize_ir

    if calibration is None:
        raise ValueError("openvino-int8 of a float model needs calibration slices")
    if _is_exported_graph(model):
        raise InputError(str(out), "openvino-int8 takes a float model; a QAT graph exports as onnx-int8")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(onnx_path) if onnx_path else Path(tmp) / "fp32.onnx"
        if not onnx_path:
            export_onnx(model, src, **onnx_kwargs)
        q, info = quantize_ir(convert_onnx(src), calibration, keep_output_float=True)
        _save(q, out)
    return {"opset": None, "quantization": "int8-nncf", "calibration": info,
            "input_shape": ["batch", 7, "h", "w"], "files": [str(p) for p in _ir_files(out)]}


def export_cls_openvino(model, out: Path, *, calibration=None, quantize: bool = False) -> dict:
    """OpenVINO IR of the 3D classifier with a free batch dimension, fp32 or NNCF int8
    (``quantize``, on ``calibration`` crops); the crop spacing goes to a sidecar ``<file>.json``."""
    from nodulekit.deploy.model_meta import write_model_meta
    from nodulekit.deploy.openvino import _ir_files, _save, convert_onnx, quantize_ir

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "cls.onnx"
        export_cls_onnx(model, src)
        ir = convert_onnx(src, batch_dynamic=True)
        info = None
        if quantize:
            if calibration is None:
                raise ValueError("openvino-int8 of a classifier needs calibration crops")
            ir, info = quantize_ir(ir, calibration, keep_output_float=False)
        _save(ir, out)
    write_model_meta(out, cls_meta(model))
    meta = {"opset": None, "quantization": "int8-nncf" if quantize else "fp32",
            "input_shape": ["batch", *_cls_shape(model)[1:]], "files": [str(p) for p in _ir_files(out)]}
    return {**meta, "calibration": info} if info else meta


@dataclass(frozen=True)
class Format:
    """One row of the formats table; ``fn`` None: the combination is not offered, ``description``
    says why."""

    kind: str
    name: str
    suffix: str
    fn: Callable[..., dict] | None
    runtime: str
    description: str


KINDS = ("seg", "cls")
FORMAT_NAMES = ("onnx", "onnx-int8", "torchscript", "rknn", "rknn-int8", "openvino", "openvino-int8")
FORMATS: dict[tuple[str, str], Format] = {(f.kind, f.name): f for f in (
    Format("seg", "onnx", ".onnx", export_onnx, "onnxruntime", "fp32 ONNX, opset 17, single file"),
    Format("seg", "onnx-int8", ".int8.onnx", export_onnx_int8, "onnxruntime", "int8 QDQ ONNX (per-channel weights)"),
    Format("seg", "torchscript", ".ts", export_torchscript, "torch", "traced TorchScript"),
    Format("seg", "rknn", ".rknn", export_rknn, "rknn", "RK3588 NPU model, fp16 (rknn-toolkit2)"),
    Format("seg", "rknn-int8", ".int8.rknn", _int8(export_rknn), "rknn", "RK3588 NPU model, toolkit int8"),
    Format("cls", "onnx", ".onnx", export_cls_onnx, "onnxruntime", "fp32 ONNX of the 3D classifier, batch 1"),
    Format("cls", "onnx-int8", ".int8.onnx", export_cls_onnx_int8, "onnxruntime",
           "int8 QDQ ONNX of the Conv2d rewrite"),
    Format("cls", "torchscript", ".ts", None, "torch",
           "not offered: a TorchScript file has no place for the crop spacing the classifier's runners "
           "need; export onnx"),
    Format("cls", "rknn", ".rknn", export_cls_rknn, "rknn", "RK3588 NPU model of the Conv2d rewrite, fp16"),
    Format("cls", "rknn-int8", ".int8.rknn", _int8(export_cls_rknn), "rknn",
           "RK3588 NPU model of the Conv2d rewrite, toolkit int8"),
    Format("seg", "openvino", ".xml", export_openvino, "openvino", "fp32 OpenVINO IR (.xml + .bin)"),
    Format("seg", "openvino-int8", ".int8.xml", export_openvino_int8, "openvino",
           "int8 OpenVINO IR, NNCF post-training quantization"),
    Format("cls", "openvino", ".xml", export_cls_openvino, "openvino",
           "fp32 OpenVINO IR of the 3D classifier, any batch"),
    Format("cls", "openvino-int8", ".int8.xml", _int8(export_cls_openvino), "openvino",
           "int8 OpenVINO IR of the 3D classifier (NNCF)"),
)}


def model_kind(model_or_ckpt) -> str:
    """``seg`` or ``cls``: what a model or checkpoint is (a checkpoint's ``arch``, else its model name)."""
    if isinstance(model_or_ckpt, (str, Path)):
        from nodulekit.models.checkpoint import read_checkpoint

        ckpt = read_checkpoint(model_or_ckpt)
        arch = ckpt.get("arch") or ""
        if arch:
            return "cls" if arch == "luna_cls" else "seg"
        return "cls" if "luna" in str(ckpt.get("model_name", "")).lower() else "seg"
    return "cls" if hasattr(model_or_ckpt, "crop") else "seg"


def format_of(kind: str, fmt: str) -> Format:
    """The table entry of ``(kind, fmt)``.

    Raises:
        ValueError: an unknown kind or format, or a combination the table does not offer.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(KINDS)}")
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMAT_NAMES)}")
    spec = FORMATS[(kind, fmt)]
    if spec.fn is None:
        raise ValueError(f"{kind} {fmt}: {spec.description}")
    return spec


def export(model_or_ckpt, fmt: str, out: str | Path, *, kind: str | None = None, variant: str = "baseline",
           **kwargs) -> Artifact:
    """Export a model (or a checkpoint path) to one format.

    Args:
        model_or_ckpt: a :class:`SegModel`, a PT2E GraphModule, a ``LunaModel``, or a checkpoint path.
        fmt: one of :data:`FORMAT_NAMES`.
        out: output file, or a folder (then ``model<suffix>`` or ``cls<suffix>`` inside it).
        kind: ``seg`` or ``cls``; default: :func:`model_kind`.
        variant: the compression variant the model belongs to (kept in the metadata).
        **kwargs: passed to the table entry's function.

    Raises:
        ValueError: an unknown kind or format, or one the table does not offer for the kind.
        InputError: the export wrote nothing.
    """
    kind = kind or model_kind(model_or_ckpt)
    spec = format_of(kind, fmt)
    model = model_or_ckpt
    if isinstance(model_or_ckpt, (str, Path)):
        from nodulekit.models.checkpoint import load_cls_model, load_seg_model

        model, _ = (load_cls_model if kind == "cls" else load_seg_model)(model_or_ckpt)
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / f"{'cls' if kind == 'cls' else 'model'}{spec.suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("export %s %s (%s) -> %s with torch %s", kind, variant, fmt, out, torch.__version__)
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
                    seconds=round(seconds, 3), extra=extra, kind=kind)
