"""The scan benchmark: whole-scan detection, stage by stage, over runtimes and variants, interleaved.

Each row is one way to run the detector (a runtime and precision for the segmentation U-Net and the
classifier). Every repeat runs every row once on the same scan, the order rotated by one per repeat,
so a burst of load from another process hits all rows alike; each stage's figure is the median over
the repeats. The CPU (``lscpu`` model name and flags) and the thread count go with the result: the
int8 and bf16 rows depend on VNNI / AVX512-BF16 / AMX being there.

int8 rows are calibrated on lung slices of the benchmarked scan itself: they are timed here, not
judged (the compression study judges int8 on held-out data).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulekit.log import get_logger

log = get_logger("detect")

STAGES = ("lung_mask", "segmentation", "clean_up", "candidates", "crops", "cls_network", "classification", "png")
# (row name, seg format, seg runtime, classifier format, classifier runtime); torch is the checkpoint itself
ROWS = (
    ("torch fp32", None, "torch", None, "torch"),
    ("onnxruntime fp32", "onnx", "onnx", "onnx", "onnx"),
    ("onnxruntime int8", "onnx-int8", "onnx", "onnx", "onnx"),
    ("openvino fp32", "openvino", "openvino", "openvino", "openvino"),
    ("openvino int8", "openvino-int8", "openvino", "openvino", "openvino"),
    ("openvino fp32, int8 classifier", "openvino", "openvino", "openvino-int8", "openvino"),  # detect --cls-int8
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
CALIB_SLICES = 16


def cpu_info() -> dict:
    """``lscpu``'s model name and flags (``/proc/cpuinfo`` where lscpu is missing), the flags that
    decide int8 / bf16 kernels, and the number of CPUs."""
    import os

    fields = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    except (OSError, subprocess.SubprocessError):
        pass
    model, flags = fields.get("Model name", ""), fields.get("Flags", "")
    if not model or not flags:
        try:
            info = Path("/proc/cpuinfo").read_text().splitlines()
            model = model or next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), "")
            flags = flags or next((x.split(":", 1)[1].strip() for x in info if x.startswith("flags")), "")
        except OSError:
            pass
    have = set(flags.split())
    return {"model_name": model, "cpus": os.cpu_count(), "key_flags": [f for f in CPU_FLAGS if f in have],
            "flags": flags}


@dataclass
class Row:
    """One way to run the detector."""

    name: str
    seg: str
    seg_backend: str
    cls: str
    cls_backend: str
    runs: list = field(default_factory=list)
    load_s: float | None = None
    error: str | None = None


def calibration_slices(ct, lung, n: int = CALIB_SLICES) -> np.ndarray:
    """``n`` whole 7-channel slices spread over the lung of ``ct``."""
    from nodulekit.detect.candidates import seg_batch

    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    pick = zs[np.linspace(0, len(zs) - 1, min(n, len(zs))).round().astype(int)]
    x = seg_batch(ct.hu, pick)
    pad = [(0, 0), (0, 0), (0, -x.shape[2] % 16), (0, -x.shape[3] % 16)]
    return np.pad(x, pad, constant_values=-1000.0) if any(p[1] for p in pad) else x


def prepare_rows(seg: str | Path, cls: str | Path, ct, lung, work: Path, *, rows=ROWS,
                 variants: dict[str, str] | None = None) -> list[Row]:
    """Export ``seg`` and ``cls`` checkpoints to each row's format under ``work``; a variant (name ->
    checkpoint or deployed file) gets the same rows (a deployed file: the runtimes that read it)."""
    from nodulekit.deploy.export import FORMATS, export
    from nodulekit.deploy.openvino import openvino_available

    calib = None
    out: list[Row] = []
    cls_files: dict[str, str] = {}
    entries = [("", str(seg))] + [(f"{k} ", str(v)) for k, v in (variants or {}).items()]
    for prefix, src in entries:
        deployed = Path(src).suffix in (".onnx", ".xml")
        for name, seg_fmt, seg_rt, cls_fmt, cls_rt in rows:
            if "openvino" in (seg_rt, cls_rt) and not openvino_available():
                continue
            row = Row(prefix + name, src, seg_rt, str(cls), cls_rt)
            try:
                if deployed:
                    # a deployed file (e.g. a QAT graph's int8 ONNX) runs as it is, in the runtimes reading it
                    if seg_fmt not in ("onnx", "openvino") or (Path(src).suffix == ".xml" and seg_rt != "openvino"):
                        continue
                    row.name = f"{prefix}{seg_rt}" + (", int8 classifier" if (cls_fmt or "").endswith("int8") else "")
                elif seg_fmt is not None:
                    kwargs = {}
                    if seg_fmt.endswith("int8"):
                        if calib is None:
                            calib = calibration_slices(ct, lung)
                        kwargs["calibration"] = calib
                    dest = work / f"{prefix.strip() or 'seg'}{FORMATS[('seg', seg_fmt)].suffix}"
                    row.seg = export(src, seg_fmt, dest, kind="seg", **kwargs).path
                if cls_fmt is not None:
                    if cls_fmt not in cls_files:
                        dest = work / f"cls{FORMATS[('cls', cls_fmt)].suffix}"
                        if cls_fmt == "openvino-int8":  # the file `detect --cls-int8` runs
                            from nodulekit.deploy.runtime import export_int8_classifier

                            cls_files[cls_fmt] = export_int8_classifier(cls, dest).path
                        else:
                            cls_files[cls_fmt] = export(cls, cls_fmt, dest, kind="cls").path
                    row.cls = cls_files[cls_fmt]
            except Exception as exc:  # noqa: BLE001 - a row that cannot be built is reported, not fatal
                row.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            out.append(row)
    return out


def _run_once(ct, seg_runner, cls_runner, png_dir: Path, threshold: float, max_png: int | None) -> dict:
    from nodulekit.detect.pipeline import detect_scan
    from nodulekit.detect.render import NoduleRenderer

    res = detect_scan(ct, seg_runner, cls_runner)
    t = time.perf_counter()
    nodules = sorted((c for c in res["candidates"] if c.probability >= threshold), key=lambda c: -c.probability)
    with NoduleRenderer() as renderer:
        for k, cand in enumerate(nodules[:max_png]):
            renderer.render(ct, res["labels"], cand, png_dir / f"{k}.png")
    timings = {**res["timings_s"], "png": time.perf_counter() - t}
    timings["total"] = sum(v for k, v in timings.items() if k not in ("crops", "cls_network"))
    return {"timings_s": timings, "n_candidates": len(res["candidates"]), "n_nodules": len(nodules),
            "candidates": [(tuple(round(v, 2) for v in c.center_irc), c.probability) for c in res["candidates"]]}


def bench_scan(ct_path: str | Path, seg: str | Path, cls: str | Path, *, variants: dict[str, str] | None = None,
               rows=ROWS, repeats: int = 2, threads: int = 2, threshold: float = 0.5,
               max_png: int | None = None, work_dir: str | Path | None = None) -> dict:
    """Run every row on one scan ``repeats`` times, interleaved, and return per-stage medians.

    Args:
        ct_path: the scan (any input ``nodulekit detect`` reads).
        seg, cls: segmentation and classifier checkpoints.
        variants: more segmentation models (name -> checkpoint or deployed file), e.g. the study's
            ``pruned`` and ``pruned_qat``.
        rows: (name, seg format, seg runtime, cls format, cls runtime) entries, default :data:`ROWS`.
        repeats: runs of each row.
        threads: CPU threads of every runtime.
        threshold, max_png: the PNGs drawn, as ``nodulekit detect``.
        work_dir: where the exports go (default: a temporary folder).

    Returns:
        ``{"cpu", "threads", "scan", "read_s", "rows": [{"name", "seg", "cls", "backends", "load_s",
        "stages_s": {stage: median}, "n_candidates", "same_as_first"}]}``.
    """
    from nodulekit.data.ct import read_ct
    from nodulekit.deploy.runtime import load_runner
    from nodulekit.detect.lung_mask import lung_mask

    t = time.perf_counter()
    ct = read_ct(ct_path, min_slices=7)
    read_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        table = prepare_rows(seg, cls, ct, lung_mask(ct.hu, ct.spacing), work, rows=rows, variants=variants)
        runners = {}
        for row in table:
            if row.error:
                continue
            try:
                t = time.perf_counter()
                runners[row.name] = (load_runner(row.seg, "seg", row.seg_backend, threads),
                                     load_runner(row.cls, "cls", row.cls_backend, threads))
                row.load_s = time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001
                row.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        live = [r for r in table if r.name in runners]
        for i in range(repeats):
            k = i % max(1, len(live))
            for row in live[k:] + live[:k]:
                log.info("scan bench: %s, repeat %d", row.name, i + 1)
                row.runs.append(_run_once(ct, *runners[row.name], work / "png" / row.name.replace(" ", "_"),
                                          threshold, max_png))
    out_rows = []
    ref = live[0].runs[0]["candidates"] if live else None
    for row in table:
        doc = {"name": row.name, "seg": row.seg, "cls": row.cls, "backends": [row.seg_backend, row.cls_backend],
               "load_s": None if row.load_s is None else round(row.load_s, 3)}
        if row.error or not row.runs:
            out_rows.append({**doc, "error": row.error or "not run"})
            continue
        stages = {}
        for key in (*STAGES, "total"):
            vals = [r["timings_s"].get(key) for r in row.runs if r["timings_s"].get(key) is not None]
            if vals:
                stages[key] = round(float(np.median(vals)), 3)
        cands = row.runs[0]["candidates"]
        same = len(cands) == len(ref) and all(
            a[0] == b[0] and abs(a[1] - b[1]) <= 1e-3 for a, b in zip(cands, ref))
        out_rows.append({**doc, "stages_s": stages, "n_candidates": row.runs[0]["n_candidates"],
                         "n_nodules": row.runs[0]["n_nodules"], "same_as_first": same})
    from nodulekit.detect.candidates import VIEW_MEAN, VIEWS, VIEWS_FROM

    return {"cpu": cpu_info(), "threads": threads, "repeats": repeats, "scan": str(ct_path),
            "shape_zyx": list(ct.shape), "read_s": round(read_s, 3), "views": VIEWS, "views_from": VIEWS_FROM,
            "view_mean": VIEW_MEAN, "rows": out_rows}


def format_table(result: dict) -> str:
    """The benchmark as a Markdown table, seconds per stage (medians)."""
    cols = ("lung_mask", "segmentation", "clean_up", "candidates", "crops", "cls_network", "png", "total")
    head = ["row", *cols, "candidates", "same"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |")
            continue
        s = r["stages_s"]
        cells = [f"{s[c]:.2f}" if c in s else "-" for c in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['n_candidates']} | "
                     f"{'yes' if r['same_as_first'] else 'no'} |")
    # results saved before the views (or their mean) were recorded say nothing of them
    views = "."
    if "views" in result:
        mean = f", their {result['view_mean']} mean" if "view_mean" in result else ""
        views = f" ({result['views']} views from {result['views_from']:g}{mean})."
    cpu = result["cpu"]
    lines.append("")
    lines.append(f"CPU: {cpu['model_name']} ({cpu['cpus']} CPUs; {', '.join(cpu['key_flags']) or 'no AVX2'}), "
                 f"{result['threads']} threads, median of {result['repeats']} interleaved runs, scan "
                 f"{'x'.join(map(str, result['shape_zyx']))}, read {result['read_s']:.2f} s. "
                 "candidates: the 3D components after clean_up; crops + cls_network: the classification" + views)
    return "\n".join(lines)
