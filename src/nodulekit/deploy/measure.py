"""The one measurement loop: every row of the report's tables (schema: :mod:`nodulekit.deploy.rows`)
gets its size, weight memory and quality the same way, its latency from one interleaved timer (or,
for an NPU build, from the board), and its ratios against the table's baseline row. The
segmentation study, the classifier study and :func:`npu_rows` all fill their rows here."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nodulekit import SEG_CHANNELS, SEG_THRESHOLD
from nodulekit.deploy.bench import BENCH_SUFFIXES, bench
from nodulekit.deploy.rows import add_ratios, new_row
from nodulekit.log import get_logger

log = get_logger("deploy")


def measure(rows: list[dict], *, quality: Callable[[dict], dict], x: np.ndarray | None = None,
            shape=None, runs: int = 20, warmup: int = 3, threads: int = 2, baseline: str | None = None,
            weight_memory: Callable[[dict], float] | None = None, timings: dict | None = None) -> None:
    """Fill every row with an ``artifact`` and no ``error``, in place: :func:`fill_quality`, then
    :func:`fill_latency`, then :func:`add_ratios` against ``baseline``.

    Args:
        timings: gets ``evaluate`` and ``bench`` seconds.
    """
    fill_quality(rows, quality=quality, weight_memory=weight_memory, timings=timings)
    fill_latency(rows, x=x, shape=shape, runs=runs, warmup=warmup, threads=threads, timings=timings)
    if baseline is not None:
        add_ratios(rows, baseline)


def fill_quality(rows: list[dict], *, quality: Callable[[dict], dict],
                 weight_memory: Callable[[dict], float] | None = None, timings: dict | None = None) -> None:
    """One loop per row with an ``artifact`` and no ``error``: ``size_kib``, ``weight_memory_kib``
    (``weight_memory(row)``, else counted from the ONNX file) and the quality metrics
    ``quality(row)`` returns; a failure becomes the row's ``error``. ``timings`` gets ``evaluate``."""
    from nodulekit.deploy.onnx_utils import weight_memory_bytes

    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    for row in _todo(rows):
        try:
            path = row["artifact"]
            row["size_kib"] = os.path.getsize(path) / 1024
            row["weight_memory_kib"] = (weight_memory(row) if weight_memory else weight_memory_bytes(path) / 1024)
            row.update(quality(row))
        except Exception as exc:  # one failed row must not stop the others
            log.exception("measuring %s failed", row["name"])
            row["error"] = f"{type(exc).__name__}: {exc}"
    timings["evaluate"] = round(time.perf_counter() - t0, 2)


def fill_latency(rows: list[dict], *, x: np.ndarray | None = None, shape=None, runs: int = 20, warmup: int = 3,
                 threads: int = 2, timings: dict | None = None) -> None:
    """One interleaved :func:`bench` run times every row's CPU artifact on ``x`` (or a random input
    of ``shape``): ``latency_us`` and its 10th and 90th percentiles. NPU files are timed on the
    board (their rows keep ``latency_us`` None here). ``timings`` gets ``bench``.

    Kept apart from :func:`fill_quality` so that a caller can build and evaluate while other work
    shares the CPU, and time only once the CPU is its own."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    ok = [r for r in _todo(rows) if Path(r["artifact"]).suffix in BENCH_SUFFIXES]
    kind = ok[0]["kind"] if ok else "seg"
    kwargs = {"shape": shape} if shape is not None else {}
    results = {b["artifact"]: b for b in bench([r["artifact"] for r in ok], runs=runs, warmup=warmup,
                                               threads=threads, x=x, kind=kind, **kwargs)} if ok else {}
    for r in ok:
        b = results[r["artifact"]]
        r["latency_us"] = b.get("latency_us")
        r["latency_p10_us"], r["latency_p90_us"] = b.get("p10_us"), b.get("p90_us")
        if "error" in b:
            r["error"] = b["error"]
    timings["bench"] = round(time.perf_counter() - t0, 2)


def _todo(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r and r.get("artifact")]


# how each compression variant is built: fp16 (no quantization), toolkit int8, or the QDQ graph's int8
BUILD_MODES = {"fp16": False, "ptq": True, "qat": False}


def npu_rows(variants, out_dir, *, calibration=None, val_ds=None, max_slices: int = 8,
             algorithm: str = "normal", device_id: str | None = None, target: str = "rk3588") -> list[dict]:
    """``report.json["npu"]``: build every variant for the NPU (:func:`nodulekit.deploy.rknn.build_rknn`)
    and measure it with :func:`measure`.

    Args:
        variants: ``(name, onnx_path, mode)`` triples; ``mode`` is ``fp16`` (float model),
            ``ptq`` (int8 by the toolkit from ``calibration``) or ``qat`` (a QDQ ONNX, built as is).
        out_dir: where the ``.rknn`` files and build logs go.
        calibration: input arrays for the ``ptq`` builds.
        val_ds: a segmentation validation dataset; recall is measured on ``max_slices`` of its slices
            (the simulator runs one slice at a time, slowly) with :func:`evaluate_seg`.
        algorithm: toolkit quantization algorithm of the ``ptq`` builds.
        device_id: a connected board: latency comes from ``eval_perf`` there.

    Returns:
        One row per variant (:mod:`nodulekit.deploy.rows`, kind ``seg``) with ``mode``,
        ``internal_memory_kib``, ``recall`` (on ``recall_slices`` slices, None without ``val_ds``),
        ``cpu_fallback_layers``, ``cycles_estimate``, ``min_cosine``, ``latency_us`` (None until a
        board measures it) and the weight-memory ratio against the first fp16 build (the float
        baseline's); a failed build gives a row with ``error``.
    """
    from nodulekit.data.seg_dataset import SliceSubset, pick_slices
    from nodulekit.deploy.rknn import build_rknn
    from nodulekit.errors import NodulekitError

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subset, inputs = None, []
    if val_ds is not None and len(val_ds):
        subset = SliceSubset(val_ds, pick_slices(val_ds, max_slices))
        inputs = [np.asarray(subset[i][0], dtype=np.float32)[None] for i in range(len(subset))]
    rows, built = [], {}
    for name, onnx_path, mode in variants:
        toolkit_int8 = BUILD_MODES.get(mode, False)
        row = new_row(name, "seg", "rknn-int8" if toolkit_int8 else "rknn", "fp16" if mode == "fp16" else "int8",
                      str(out_dir / f"{name}.rknn"), mode=mode, internal_memory_kib=None, recall=None,
                      recall_slices=len(inputs), cpu_fallback_layers=None, cycles_estimate=None, min_cosine=None)
        try:
            if mode not in BUILD_MODES:
                raise ValueError(f"unknown NPU build mode {mode!r} (fp16, ptq, qat)")
            built[name] = build_rknn(onnx_path, out_dir / f"{name}.rknn", quantize=toolkit_int8,
                                     dataset=calibration if toolkit_int8 else None, algorithm=algorithm,
                                     target=target,
                                     input_size=inputs[0].shape if inputs else (1, SEG_CHANNELS, 512, 512),
                                     eval_inputs=inputs, analysis_input=inputs[0] if inputs else None,
                                     device_id=device_id)
        except (NodulekitError, ValueError, OSError) as exc:
            row["error"] = str(exc).splitlines()[0]
            log.warning("npu row %s failed: %s", name, row["error"])
        rows.append(row)

    def quality(row: dict) -> dict:
        info = built[row["name"]]
        out = {k: info[k] for k in ("internal_memory_kib", "cpu_fallback_layers", "cycles_estimate", "dtypes")}
        out["min_cosine"] = min((r["entire_cos"] for r in info["accuracy"]), default=None)
        if info.get("perf"):
            out["latency_us"] = info["perf"]["total_us"]
        if subset is not None and len(info["outputs"]) == len(inputs) and all(info["outputs"]):
            out["recall"] = _simulated_recall(subset, inputs, info["outputs"])
        if info["errors"]:
            out["step_errors"] = info["errors"]
        return out

    fp16 = next((r["name"] for r in rows if r["mode"] == "fp16"), rows[0]["name"] if rows else None)
    measure(rows, quality=quality, weight_memory=lambda row: built[row["name"]]["weight_memory_kib"], baseline=fp16)
    return rows


def _simulated_recall(subset, inputs: list[np.ndarray], outputs: list[list[np.ndarray]]):
    from nodulekit.evaluate.seg_metrics import evaluate_seg

    # the simulator ran in the build session, so its outputs are looked up by input content
    table = {x.tobytes(): out[0].reshape(1, 1, *x.shape[-2:]) for x, out in zip(inputs, outputs)}

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([table[np.ascontiguousarray(s[None], dtype=np.float32).tobytes()] for s in batch])

    return evaluate_seg(predict, subset, threshold=SEG_THRESHOLD, batch_size=1)["recall"]
