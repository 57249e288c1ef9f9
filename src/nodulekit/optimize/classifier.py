"""Classifier deployment study: the 3D model, its Conv2d rewrite, int8 ONNX and RKNN builds.

Every form is written by the one exporter (:func:`nodulekit.deploy.export.export`, kind ``cls``) and
measured by the one loop (:func:`nodulekit.deploy.measure.measure`): AUC and F1 on held-out
candidates, CPU latency with ONNX Runtime (2 threads, batch 1, median, interleaved), weight memory,
file size, and the largest logit difference from the 3D PyTorch model. A failure becomes a row with
``error`` instead of ending the study.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nodulekit import VAL_FRACTION
from nodulekit.log import get_logger

log = get_logger("optimize")

RKNN_EVAL_CROPS = 256  # the simulator runs one crop at a time; the RKNN rows use this many
CALIB_CROPS = 32  # held-out crops, evenly spaced, that calibrate the int8 forms
BASELINE = "cls3d_onnx_fp32"


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (NaN without both classes)."""
    from nodulekit.train.cls import auc_score

    return auc_score(labels, scores)


def _score(logits: np.ndarray) -> np.ndarray:
    # the logit margin ranks like the softmax probability but does not saturate to ties
    return logits[:, 1] - logits[:, 0]


def _f1(logits: np.ndarray, labels) -> float:
    """F1 of "nodule" at probability 0.5 (a positive logit margin), as training reports it."""
    from nodulekit.train.cls import cls_metrics

    return cls_metrics(labels, _score(logits), threshold=0.0)["f1"]


def held_out_crops(data_dir, crop_spacing, *, max_negatives: int = 500, val_fraction: float = VAL_FRACTION,
                   split_file=None, context: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The held-out candidates' crops ``(N, C, D, H, W)`` and labels (the split of training, or
    ``split_file``'s); two channels with ``context``."""
    from nodulekit.data.cls_dataset import build_cls_datasets

    _, val = build_cls_datasets(data_dir, val_fraction=val_fraction, split_file=split_file,
                                val_max_negatives=max_negatives, crop_spacing=crop_spacing, context=context)
    crops = np.stack([np.asarray(val[i][0], dtype=np.float32) for i in range(len(val))])
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    return crops, labels


def calibration_crops(crops: np.ndarray, n: int = CALIB_CROPS) -> np.ndarray:
    """``n`` crops evenly spaced through ``crops``: the int8 forms' calibration set."""
    return crops[np.linspace(0, len(crops) - 1, min(n, len(crops))).astype(int)]


def _logits_of(outputs) -> np.ndarray:
    return np.concatenate([o[0].reshape(1, -1) for o in outputs])


def classifier_study(cls_ckpt, data_dir, out_dir, rknn: bool, *, max_negatives: int = 500,
                     val_fraction: float = VAL_FRACTION, split_file=None, crops: np.ndarray | None = None,
                     labels: np.ndarray | None = None) -> list[dict]:
    """``report.json["classifier"]`` rows for the deployment forms of a trained classifier.

    Args:
        cls_ckpt: ``LunaModel`` checkpoint.
        data_dir: LUNA16-layout data; its held-out candidates give the AUC.
        out_dir: where the ONNX and RKNN files go.
        rknn: also build fp16 and int8 RKNN models (needs ``.venv-rknn``).
        max_negatives: non-nodule candidates kept in the held-out set.
        val_fraction: share of scans held out (the split of training).
        split_file: a split file (:func:`nodulekit.data.split.write_split`) that fixes the held-out
            scans instead of ``val_fraction``.
        crops, labels: use these held-out crops ``(N, C, 32, 48, 48)`` instead of ``data_dir``'s.

    Returns:
        Rows of :mod:`nodulekit.deploy.rows` (kind ``cls``) with ``params``, ``auc``, ``f1``,
        ``max_abs_diff_vs_3d`` (+ ``macs``, ``cpu_fallback_layers``, ``cycles_estimate``,
        ``auc_crops`` or ``error`` where they apply), ratios against ``cls3d_onnx_fp32``.
    """
    from nodulekit.deploy.export import export
    from nodulekit.deploy.measure import measure
    from nodulekit.deploy.rows import new_row
    from nodulekit.deploy.runtime import OnnxRunner
    from nodulekit.errors import NodulekitError
    from nodulekit.models.checkpoint import load_cls_model
    from nodulekit.models.cls2d import conv_macs, to_conv2d

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, _ = load_cls_model(cls_ckpt)
    if crops is None:
        crops, labels = held_out_crops(data_dir, model.crop_spacing, context=model.context, max_negatives=max_negatives,
                                       val_fraction=val_fraction, split_file=split_file)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(crops[i:i + 64]))[0].numpy() for i in range(0, len(crops), 64)])
    conv2d = to_conv2d(model)
    calib = calibration_crops(crops)
    onnx3d = export(model, "onnx", out_dir / "cls3d.onnx", kind="cls").path
    onnx2d = export(conv2d, "onnx", out_dir / "cls2d.onnx", kind="cls").path
    rows, weights_kib, evaluated = [], {}, {}
    # (name, format, file, module, bytes per stored weight, export arguments)
    forms = [("cls3d_onnx_fp32", "onnx", onnx3d, model, 4, None),
             ("cls2d_onnx_fp32", "onnx", onnx2d, conv2d, 4, None),
             ("cls2d_onnx_int8", "onnx-int8", out_dir / "cls2d.int8.onnx", conv2d, 1,
              {"calibration": calib, "fp32_onnx": onnx2d})]
    for name, fmt, path, module, bytes_per_weight, kwargs in forms:
        row = new_row(name, "cls", fmt, "int8-qdq" if fmt == "onnx-int8" else "fp32", str(path), params=None,
                      auc=None, f1=None, max_abs_diff_vs_3d=None)
        try:
            if kwargs is not None:
                export(conv2d, fmt, path, kind="cls", **kwargs)
            params = sum(p.numel() for p in module.parameters())
            row.update(params=params, macs=conv_macs(module, (1, model.in_channels, *model.crop)))
            weights_kib[name] = params * bytes_per_weight / 1024
        except Exception as exc:  # one failed form is a row, not a failed study
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    if rknn:
        idx = np.linspace(0, len(crops) - 1, min(RKNN_EVAL_CROPS, len(crops))).astype(int)
        idx = np.unique(np.concatenate([idx, np.flatnonzero(labels)]))  # every nodule counts for the AUC
        for name, fmt, src, conv in (("cls3d_rknn_fp16", "rknn", onnx3d, False),
                                     ("cls2d_rknn_fp16", "rknn", onnx2d, True),
                                     ("cls2d_rknn_int8", "rknn-int8", onnx2d, True)):
            row = new_row(name, "cls", fmt, "int8" if fmt == "rknn-int8" else "fp16", str(out_dir / f"{name}.rknn"),
                          params=None, auc=None, f1=None, max_abs_diff_vs_3d=None)
            try:
                art = export(model, fmt, row["artifact"], kind="cls", conv2d=conv, onnx_path=src,
                             eval_inputs=[crops[i][None] for i in idx],
                             **({"dataset": calib} if fmt == "rknn-int8" else {}))
                info = art.extra["rknn"]
                weights_kib[name] = info["weight_memory_kib"]
                evaluated[name] = (_logits_of(info["outputs"]), idx)
                row.update(auc_crops=len(idx), cpu_fallback_layers=info["cpu_fallback_layers"],
                           cycles_estimate=info["cycles_estimate"])
            except (NodulekitError, OSError, ValueError) as exc:
                row["error"] = str(exc).splitlines()[0]
            rows.append(row)

    def quality(row: dict) -> dict:
        if row["name"] in evaluated:  # the simulator's outputs of the build
            logits, which = evaluated[row["name"]]
        else:
            logits, which = OnnxRunner(row["artifact"], threads=None)._run(crops)[0], slice(None)
            logits = logits.reshape(len(crops), -1)
        return {"auc": auc(_score(logits), labels[which]), "f1": _f1(logits, labels[which]),
                "max_abs_diff_vs_3d": float(np.abs(logits - ref[which]).max())}

    measure(rows, quality=quality, weight_memory=lambda row: weights_kib[row["name"]], x=crops[:1],
            baseline=BASELINE)
    for r in rows:
        log.info("classifier %s: %s", r["name"], {k: v for k, v in r.items() if k != "name"})
    return rows
