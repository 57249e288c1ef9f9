"""The one row schema of every table the report shows (:mod:`nodulekit.deploy.measure` fills the rows).

A row is a JSON-ready dict. Every row (segmentation variants, classifier forms, NPU builds) has the
common keys:

==================  ==========================================================================
key                 meaning
==================  ==========================================================================
name                the row's name (a variant name, ``cls2d_onnx_int8``, ...)
kind                ``seg`` or ``cls``
format              the export format (:data:`nodulekit.deploy.export.FORMAT_NAMES`)
quantization        ``fp32``, ``fp16``, ``int8-qdq`` or ``int8``
artifact            the deployed file (relative to the study folder once written)
size_kib            file size
weight_memory_kib   what the weights take in the deployed format
latency_us          median latency (:func:`nodulekit.deploy.bench.bench`, which also gives CPU
                    rows ``latency_p10_us`` and ``latency_p90_us``; NPU rows: the board's
                    profiler, None without a board)
*_ratio             ``weight_memory_ratio``, ``size_ratio``, ``latency_ratio``: the baseline row's
                    value over this row's (how many times smaller / faster), where both are known
error               present only when the row failed; then the figures may be None
==================  ==========================================================================

and its quality metrics: ``recall``, ``precision``, ``dice``, ``nodule_recall`` and
``recall_change_pts`` (points against the baseline) for ``seg``; ``auc``, ``f1`` and
``max_abs_diff_vs_3d`` for ``cls``. Tables add their own keys (``params``, ``macs``,
``cpu_fallback_layers``, ...).
"""

from __future__ import annotations


COMMON_KEYS = ("name", "kind", "format", "quantization", "artifact", "size_kib", "weight_memory_kib", "latency_us")
RATIOS = {"weight_memory_kib": "weight_memory_ratio", "size_kib": "size_ratio", "latency_us": "latency_ratio"}


def new_row(name: str, kind: str, fmt: str | None = None, quantization: str | None = None,
            artifact: str | None = None, **fields) -> dict:
    """A row with every common key (None where not known yet) and ``fields``."""
    row = dict.fromkeys(COMMON_KEYS)
    row.update(name=name, kind=kind, format=fmt, quantization=quantization, artifact=artifact)
    row.update(fields)
    return row


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Ratios against the row named ``baseline`` (in place; rows with an ``error`` get none), and
    ``recall_change_pts`` where both rows have a recall."""
    base = next((r for r in rows if r["name"] == baseline and "error" not in r), None)
    if base is None:
        return
    for r in rows:
        if "error" in r:
            continue
        for key, ratio in RATIOS.items():
            if r.get(key) and base.get(key):
                r[ratio] = base[key] / r[key]
        if r.get("recall") is not None and base.get("recall") is not None:
            r["recall_change_pts"] = 100.0 * (r["recall"] - base["recall"])
