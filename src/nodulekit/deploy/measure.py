"""The one measurement loop: every row of the report's tables (schema: :mod:`nodulekit.deploy.rows`)
gets its size, weight memory and quality the same way, and its latency from one interleaved timer."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nodulekit.deploy.bench import BENCH_SUFFIXES, bench
from nodulekit.deploy.rows import add_ratios
from nodulekit.log import get_logger

log = get_logger("deploy")


def measure(rows: list[dict], *, quality: Callable[[dict], dict], x: np.ndarray | None = None,
            shape=None, runs: int = 20, warmup: int = 3, threads: int = 2, baseline: str | None = None,
            weight_memory: Callable[[dict], float] | None = None, timings: dict | None = None) -> None:
    """Fill every row with an ``artifact`` and no ``error``, in place.

    One loop per row: ``size_kib``, ``weight_memory_kib`` (``weight_memory(row)``, else counted from
    the ONNX file) and the quality metrics ``quality(row)`` returns; a failure becomes the row's
    ``error``. Then one interleaved :func:`bench` run times every row's CPU artifact on ``x`` (or a
    random input of ``shape``), and :func:`add_ratios` compares each row with ``baseline``.

    Args:
        timings: gets ``evaluate`` and ``bench`` seconds.
    """
    from nodulekit.deploy.onnx_utils import weight_memory_bytes

    timings = {} if timings is None else timings
    todo = [r for r in rows if "error" not in r and r.get("artifact")]
    t0 = time.perf_counter()
    for row in todo:
        try:
            path = row["artifact"]
            row["size_kib"] = os.path.getsize(path) / 1024
            row["weight_memory_kib"] = (weight_memory(row) if weight_memory else weight_memory_bytes(path) / 1024)
            row.update(quality(row))
        except Exception as exc:  # one failed row must not stop the others
            log.exception("measuring %s failed", row["name"])
            row["error"] = f"{type(exc).__name__}: {exc}"
    timings["evaluate"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    # NPU files are timed on the board (their rows keep latency_us None here)
    ok = [r for r in todo if "error" not in r and Path(r["artifact"]).suffix in BENCH_SUFFIXES]
    kind = ok[0]["kind"] if ok else "seg"
    kwargs = {"shape": shape} if shape is not None else {}
    results = {b["artifact"]: b for b in bench([r["artifact"] for r in ok], runs=runs, warmup=warmup,
                                               threads=threads, x=x, kind=kind, **kwargs)}
    for r in ok:
        b = results[r["artifact"]]
        r["latency_us"] = b.get("latency_us")
        r["latency_p10_us"], r["latency_p90_us"] = b.get("p10_us"), b.get("p90_us")
        if "error" in b:
            r["error"] = b["error"]
    timings["bench"] = round(time.perf_counter() - t0, 2)
    if baseline is not None:
        add_ratios(rows, baseline)
