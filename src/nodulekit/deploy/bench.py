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


def load_runner(path: str | Path, threads: int = 2):
    """A callable on numpy batches for an ``.onnx`` (ONNX Runtime) or ``.ts`` (TorchScript) file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "artifact not found")
    if path.suffix == ".onnx":
        from nodulekit.deploy.runtime import OnnxRunner

        return OnnxRunner(path, threads=threads)
    if path.suffix in (".ts", ".pt", ".jit"):
        import torch

        try:
            module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise InputError(path, f"not a TorchScript file ({exc})") from None

        def run(x):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run
    raise InputError(path, "cannot benchmark this file type (expected .onnx or .ts)")


def bench(paths, *, runs: int = 20, warmup: int = 3, threads: int = 2, shape=BENCH_SHAPE,
          seed: int = 0) -> list[dict]:
    """Median latency of each artifact on one ``shape`` input, interleaved round-robin.

    Args:
        paths: artifact files (``.onnx``, ``.ts``).
        runs: timed runs per artifact.
        warmup: untimed runs per artifact first.
        threads: intra-op threads of every runtime.
        shape: input shape (default one 1x7x512x512 slice).
        seed: seed of the random HU input.

    Returns:
        One row per artifact: ``artifact``, ``latency_us`` (median), ``p10_us``, ``p90_us``,
        ``mean_us``, ``runs``, ``threads``, or ``error`` when it cannot be loaded or run.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(HU_MIN, HU_MAX, size=shape).astype(np.float32)
    rows = {str(p): {"artifact": str(p), "runs": runs, "threads": threads} for p in paths}
    runners = {}
    for p in rows:
        try:
            runner = load_runner(p, threads)
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
