"""Classifier deployment study: the 3D model, its Conv2d rewrite, int8 ONNX and RKNN builds.

Every row is measured the same way: AUC on held-out candidates, CPU latency with ONNX Runtime
(2 threads, batch 1, median), weight memory, file size, and the largest logit difference from the
3D PyTorch model. A failure becomes a row with ``error`` instead of ending the study.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from nodulekit import CLS_CROP
from nodulekit.log import get_logger

log = get_logger("optimize")

RKNN_EVAL_CROPS = 256  # the simulator runs one crop at a time; the RKNN rows use this many


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (NaN without both classes)."""
    from nodulekit.train.cls import auc_score

    return auc_score(labels, scores)


def export_cls_onnx(model: torch.nn.Module, out: Path, crop=CLS_CROP) -> Path:
    """Static batch-1 ONNX (opset 17) with outputs ``logits`` and ``probs``, and the model's crop
    spacing in its metadata (:mod:`nodulekit.deploy.model_meta`).

    A model with ``spatial_outputs`` (the Conv2d rewrite) is exported with ``(1, 2, 1, 1)`` outputs,
    so that the NPU has no Reshape to leave to its CPU; the runners read both shapes.
    """
    from nodulekit.deploy.model_meta import write_model_meta

    spatial = getattr(model, "spatial_outputs", None)
    if spatial is not None:
        model.spatial_outputs = True
    try:
        torch.onnx.export(model.eval(), torch.zeros(1, 1, *crop), str(out), input_names=["x"],
                          output_names=["logits", "probs"], opset_version=17, dynamo=False)
    finally:
        if spatial is not None:
            model.spatial_outputs = spatial
    write_model_meta(out, _meta(model))
    return out


def _meta(model) -> dict:
    cs = getattr(model, "crop_spacing", None)
    return {"kind": "classifier", "crop": list(getattr(model, "crop", CLS_CROP)),
            "crop_spacing_mm": None if cs is None else list(cs)}


def onnx_latency_us(path: Path, x: np.ndarray, threads: int = 2, runs: int = 20) -> float:
    """Median single-input latency of an ONNX file on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _onnx_logits(path: Path, crops: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": c[None]})[0].reshape(1, -1) for c in crops])


def _score(logits: np.ndarray) -> np.ndarray:
    # the logit margin ranks like the softmax probability but does not saturate to ties
    return logits[:, 1] - logits[:, 0]


def _f1(logits: np.ndarray, labels) -> float:
    """F1 of "nodule" at probability 0.5 (a positive logit margin), as training reports it."""
    from nodulekit.train.cls import cls_metrics

    return cls_metrics(labels, _score(logits), threshold=0.0)["f1"]


def _quantize_qdq(src: Path, out: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": c[None]} for c in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _held_out(data_dir, max_negatives: int, crop_spacing, val_fraction: float
              ) -> tuple[np.ndarray, np.ndarray]:
    from nodulekit.data.cls_dataset import build_cls_datasets

    _, val = build_cls_datasets(data_dir, val_fraction=val_fraction, val_max_negatives=max_negatives,
                                crop_spacing=crop_spacing)
    crops = np.stack([np.asarray(val[i][0], dtype=np.float32) for i in range(len(val))])
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    return crops, labels


def _row(name, **kw) -> dict:
    row = {"name": name, "params": None, "weight_memory_kib": None, "size_kib": None, "latency_us": None,
           "auc": None, "f1": None, "max_abs_diff_vs_3d": None}
    row.update(kw)
    return row


def classifier_study(cls_ckpt, data_dir, out_dir, rknn: bool, *, max_negatives: int = 500,
                     val_fraction: float = 0.25, crops: np.ndarray | None = None,
                     labels: np.ndarray | None = None) -> list[dict]:
    """``report.json["classifier"]`` rows for the deployment forms of a trained classifier.

    Args:
        cls_ckpt: ``LunaModel`` checkpoint.
        data_dir: LUNA16-layout data; its held-out candidates give the AUC.
        out_dir: where the ONNX and RKNN files go.
        rknn: also build fp16 and int8 RKNN models (needs ``.venv-rknn``).
        max_negatives: non-nodule candidates kept in the held-out set.
        val_fraction: share of scans held out (the split of training).
        crops, labels: use these held-out crops ``(N, 1, 32, 48, 48)`` instead of ``data_dir``'s.

    Returns:
        Rows ``name, params, weight_memory_kib, size_kib, latency_us, auc, f1, max_abs_diff_vs_3d``
        (+ ``macs``, ``cpu_fallback_layers``, ``auc_crops`` or ``error`` where they apply).
    """
    from nodulekit.deploy.model_meta import write_model_meta
    from nodulekit.models.checkpoint import load_cls_model
    from nodulekit.models.cls2d import conv_macs, to_conv2d

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, _ = load_cls_model(cls_ckpt)
    if crops is None:
        crops, labels = _held_out(data_dir, max_negatives, model.crop_spacing, val_fraction)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(crops[i:i + 64]))[0].numpy() for i in range(0, len(crops), 64)])
    conv2d = to_conv2d(model)
    onnx3d = export_cls_onnx(model, out_dir / "cls3d.onnx", model.crop)
    onnx2d = export_cls_onnx(conv2d, out_dir / "cls2d.onnx", model.crop)
    calib = crops[np.linspace(0, len(crops) - 1, min(32, len(crops))).astype(int)]
    rows = []
    forms = [("cls3d_onnx_fp32", onnx3d, model, 4), ("cls2d_onnx_fp32", onnx2d, conv2d, 4),
             ("cls2d_onnx_int8", out_dir / "cls2d.int8.onnx", conv2d, 1)]
    for name, path, module, bytes_per_weight in forms:
        try:
            if not path.is_file():
                _quantize_qdq(onnx2d, path, calib)
                write_model_meta(path, _meta(model))
            logits = _onnx_logits(path, crops)
            params = sum(p.numel() for p in module.parameters())
            rows.append(_row(name, params=params, weight_memory_kib=params * bytes_per_weight / 1024,
                             size_kib=path.stat().st_size / 1024, latency_us=onnx_latency_us(path, crops[:1]),
                             auc=auc(_score(logits), labels), f1=_f1(logits, labels),
                             max_abs_diff_vs_3d=float(np.abs(logits - ref).max()),
                             macs=conv_macs(module, (1, 1, *model.crop))))
        except Exception as exc:  # one failed form is a row, not a failed study
            rows.append(_row(name, error=f"{type(exc).__name__}: {exc}"))
    if rknn:
        rows += _rknn_rows(onnx3d, onnx2d, out_dir, crops, labels, ref, calib, model)
    for r in rows:
        log.info("classifier %s: %s", r["name"], {k: v for k, v in r.items() if k != "name"})
    return rows


def _rknn_rows(onnx3d, onnx2d, out_dir, crops, labels, ref, calib, model) -> list[dict]:
    from nodulekit.deploy.model_meta import write_model_meta
    from nodulekit.deploy.rknn import export_rknn
    from nodulekit.errors import NodulekitError

    idx = np.linspace(0, len(crops) - 1, min(RKNN_EVAL_CROPS, len(crops))).astype(int)
    idx = np.unique(np.concatenate([idx, np.flatnonzero(labels)]))  # every nodule counts for the AUC
    rows = []
    for name, src, quantize in (("cls3d_rknn_fp16", onnx3d, False), ("cls2d_rknn_fp16", onnx2d, False),
                                ("cls2d_rknn_int8", onnx2d, True)):
        try:
            info = export_rknn(src, out_dir / f"{name}.rknn", quantize=quantize, dataset=list(calib) if quantize else None,
                               input_size=(1, 1, *model.crop), eval_inputs=[crops[i][None] for i in idx])
            write_model_meta(out_dir / f"{name}.rknn", _meta(model))
            logits = np.concatenate([o[0].reshape(1, -1) for o in info["outputs"]])
            rows.append(_row(name, weight_memory_kib=info["weight_memory_kib"], size_kib=info["size_kib"],
                             auc=auc(_score(logits), labels[idx]), f1=_f1(logits, labels[idx]), auc_crops=len(idx),
                             max_abs_diff_vs_3d=float(np.abs(logits - ref[idx]).max()),
                             cpu_fallback_layers=info["cpu_fallback_layers"], cycles_estimate=info["cycles_estimate"]))
        except (NodulekitError, OSError, ValueError) as exc:
            rows.append(_row(name, error=str(exc).splitlines()[0]))
    return rows
