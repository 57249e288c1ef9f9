"""Latency of deployed artifacts, all measured in one interleaved run.

Every iteration runs each artifact once, in an order rotated by one per iteration, so a burst of
load from another process on a shared machine hits every artifact alike and no artifact always runs
first (cold caches) or last. Latency is the median of the per-run wall times.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nodulekit import HU_MAX, HU_MIN, SEG_CHANNELS
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("deploy")

BENCH_SHAPE = (1, SEG_CHANNELS, 512, 512)


BENCH_SUFFIXES = (".onnx", ".ts", ".jit", ".xml")


def _runner(path, threads: int, kind: str):
    from nodulekit.deploy.runtime import load_runner

    if Path(path).suffix not in BENCH_SUFFIXES:
        raise InputError(path, f"cannot benchmark this file type (expected {', '.join(BENCH_SUFFIXES)})")
    return load_runner(path, kind, threads=threads)


def bench(paths, *, runs: int = 20, warmup: int = 3, threads: int = 2, shape=BENCH_SHAPE,
          seed: int = 0, x: np.ndarray | None = None, kind: str = "seg") -> list[dict]:
    """Median latency of each artifact on one input, interleaved round-robin: the one timer of
    every latency the report shows (the NPU's come from the board's own profiler).

    Args:
        paths: artifact files (``.onnx``, ``.ts``).
        runs: timed runs per artifact.
        warmup: untimed runs per artifact first.
        threads: intra-op threads of every runtime.
        shape: input shape (default one 1x7x512x512 slice).
        seed: seed of the random HU input.
        x: time this input instead of a random one of ``shape``.
        kind: ``seg`` or ``cls``: the runner kind (:func:`nodulekit.deploy.runtime.load_runner`).

    Returns:
        One row per artifact: ``artifact``, ``latency_us`` (median), ``p10_us``, ``p90_us``,
        ``mean_us``, ``runs``, ``threads``, or ``error`` when it cannot be loaded or run.
    """
    if x is None:
        x = np.random.default_rng(seed).uniform(HU_MIN, HU_MAX, size=shape).astype(np.float32)
    rows = {str(p): {"artifact": str(p), "runs": runs, "threads": threads} for p in paths}
    runners = {}
    for p in rows:
        try:
            runner = _runner(p, threads, kind)
            for _ in range(warmup):
                runner(x)
            runners[p] = runner
        except Exception as exc:  # one broken artifact must not stop the others
            rows[p]["error"] = f"{type(exc).__name__}: {exc}"
    times: dict[str, list[float]] = {p: [] for p in runners}
    order = list(runners)
    for i in range(runs):
        k = i % max(1, len(order))
        for p in order[k:] + order[:k]:
            t0 = time.perf_counter_ns()
            runners[p](x)
            times[p].append((time.perf_counter_ns() - t0) / 1000.0)
    for p, t in times.items():
        arr = np.asarray(t)
        rows[p].update(latency_us=float(np.median(arr)), p10_us=float(np.percentile(arr, 10)),
                       p90_us=float(np.percentile(arr, 90)), mean_us=float(arr.mean()))
        log.info("bench %s: median %.0f us (p10 %.0f, p90 %.0f) over %d runs, %d threads", p,
                 rows[p]["latency_us"], rows[p]["p10_us"], rows[p]["p90_us"], runs, threads)
    return list(rows.values())
