"""The detection app: CT scans in, a table of nodules with probabilities and pictures out.

Per scan: lung mask -> segmentation of the slices holding lung -> threshold and clean-up inside
the lung -> 3D components as candidates -> classifier on a crop around each -> rows of
``nodules.csv`` (every candidate, so FROC can sweep the threshold), an entry of ``nodules.json``
and a PNG for each candidate above the threshold.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nodulekit import SEG_THRESHOLD
from nodulekit.detect.candidates import MIN_VOLUME_MM3, classify, clean_mask, find_candidates, segment_slices
from nodulekit.detect.lung_mask import lung_mask, lung_volume_ml
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("detect")

CSV_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm")
MIN_SLICES = 7  # the segmentation input is a slice with 3 neighbours on each side


def detect_scan(ct, seg_runner, cls_runner, *, seg_threshold: float = SEG_THRESHOLD, batch_size: int = 4,
                min_volume_mm3: float = MIN_VOLUME_MM3, progress: bool = False) -> dict:
    """Detect nodule candidates in one scan and classify them.

    Args:
        ct: a :class:`~nodulekit.data.volume.CTVolume`.
        seg_runner: ``(N, 7, H, W) -> (N, 1, H, W)`` probabilities.
        cls_runner: ``(N, 1, 32, 48, 48) -> (N,)`` nodule probabilities; its ``crop_spacing``
            attribute (if any) sets the crops' voxel size. ``None``: candidates only, unclassified.
        seg_threshold: segmentation probability threshold.
        batch_size: slices per segmentation call.
        min_volume_mm3: smallest component kept as a candidate.
        progress: show a progress bar over the segmented slices.

    Returns:
        ``{"candidates": [Finding], "labels": label volume, "lung_ml", "slices_segmented",
        "timings_s": {...}}``.
    """
    from tqdm import tqdm

    timings = {}
    t = time.perf_counter()
    lung = lung_mask(ct.hu, ct.spacing)
    slices = np.flatnonzero(lung.any(axis=(1, 2)))
    timings["lung_mask"] = time.perf_counter() - t

    t = time.perf_counter()
    with tqdm(total=len(slices), desc=ct.seriesuid[-16:] or "scan", unit="slice", disable=not progress,
              leave=False) as bar:
        mask = segment_slices(ct.hu, seg_runner, slices, threshold=seg_threshold, batch_size=batch_size,
                              on_batch=bar.update, lung=lung)
    timings["segmentation"] = time.perf_counter() - t

    t = time.perf_counter()
    labels, n = clean_mask(mask, lung, ct.spacing, min_volume_mm3=min_volume_mm3)
    del mask
    timings["clean_up"] = time.perf_counter() - t
    candidates = find_candidates(ct.hu, labels, n, ct)
    timings["candidates"] = time.perf_counter() - t

    if cls_runner is not None:
        t = time.perf_counter()
        classify(ct, candidates, cls_runner, timings=timings)
        timings["classification"] = time.perf_counter() - t
    return {
        "candidates": candidates,
        "labels": labels,
        "lung_ml": lung_volume_ml(lung, ct.spacing),
        "slices_segmented": int(len(slices)),
        "timings_s": timings,
    }


def _geometry(ct) -> dict:
    return {
        "shape_zyx": list(ct.shape),
        "spacing_xyz": [round(v, 4) for v in ct.spacing],
        "origin_xyz": [round(v, 3) for v in ct.origin],
        "direction": [round(float(v), 6) for v in np.asarray(ct.direction).reshape(-1)],
    }


def _csv_row(uid: str, cand) -> list[str]:
    x, y, z = cand.center_xyz
    return [uid, f"{x:.3f}", f"{y:.3f}", f"{z:.3f}", f"{cand.probability:.6f}", f"{cand.diameter_mm:.2f}"]


def run_detection(
    inputs: Iterable[str | Path],
    seg: str | Path,
    cls: str | Path,
    out_dir: str | Path,
    *,
    backend: str = "torch",
    cls_backend: str = "torch",
    threshold: float = 0.5,
    seg_threshold: float = SEG_THRESHOLD,
    batch_size: int = 4,
    threads: int = 2,
    min_volume_mm3: float = MIN_VOLUME_MM3,
    png: bool = True,
    max_png: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Detect nodules in CT scans and write ``nodules.csv``, ``nodules.json`` and PNGs.

    Args:
        inputs: scan files (``.mhd``, ``.nii.gz``), DICOM folders or LUNA16 subset folders.
        seg: segmentation checkpoint (nodulekit or dlwpt) or ``.onnx`` file.
        cls: classifier checkpoint or ``.onnx`` file.
        out_dir: output folder (created).
        backend: runtime of the segmentation model (``torch``, ``onnx``).
        cls_backend: runtime of the classifier.
        threshold: classifier probability from which a candidate is reported as a nodule.
        seg_threshold: segmentation probability threshold.
        batch_size: slices per segmentation call.
        threads: CPU threads of the runtimes.
        min_volume_mm3: smallest segmented component kept as a candidate.
        png: write ``png/<uid>_<k>.png`` for each nodule above ``threshold``.
        max_png: draw at most this many per scan, the most probable first (None: all).
        progress: progress bars; default: when stderr is a terminal.

    Returns:
        Summary: ``scans_ok``, ``scans_failed``, ``failed`` (``[{"input", "error"}]``),
        ``n_candidates``, ``n_nodules``, ``seconds_per_scan``, ``csv``, ``json``, ``scans``.

    Raises:
        InputError: a model file cannot be loaded. Bad scans, and scans a runtime fails on, are
            reported in ``failed`` and skipped instead.
    """
    from tqdm import tqdm

    from nodulekit.data.ct import iter_ct_inputs
    from nodulekit.deploy.runtime import load_cls_runner, load_seg_runner

    if progress is None:
        progress = sys.stderr.isatty()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_runner = load_seg_runner(seg, backend=backend, threads=threads)
    cls_runner = load_cls_runner(cls, backend=cls_backend, threads=threads)
    crop_spacing = getattr(cls_runner, "crop_spacing", None)
    log.info("seg %s (%s), cls %s (%s, crops at %s), %d threads", seg, backend, cls, cls_backend,
             "native voxels" if crop_spacing is None else "x".join(f"{v:g}" for v in crop_spacing) + " mm",
             threads)

    csv_path, json_path = out_dir / "nodules.csv", out_dir / "nodules.json"
    scans, failed = [], []
    t_all = time.perf_counter()
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        items = iter_ct_inputs(inputs, min_slices=MIN_SLICES)
        t_read = time.perf_counter()
        for item, ct in tqdm(items, desc="scans", unit="scan", disable=not progress):
            read_s = time.perf_counter() - t_read
            if isinstance(ct, InputError):
                msg = str(ct)
                log.warning("SKIP %s", msg)
                failed.append({"input": item, "error": msg})
                t_read = time.perf_counter()
                continue
            t_scan = time.perf_counter()
            try:
                res = detect_scan(ct, seg_runner, cls_runner, seg_threshold=seg_threshold, batch_size=batch_size,
                                  min_volume_mm3=min_volume_mm3, progress=progress)
            except Exception as exc:  # noqa: BLE001 - one scan a runtime cannot take must not stop the batch
                msg = f"{item}: {type(exc).__name__}: {exc}".splitlines()[0]
                log.warning("FAILED %s", msg)
                failed.append({"input": item, "seriesuid": ct.seriesuid, "error": msg})
                t_read = time.perf_counter()
                continue
            cands = sorted(res["candidates"], key=lambda c: -c.probability)
            writer.writerows(_csv_row(ct.seriesuid, c) for c in cands)
            fh.flush()
            nodules = [c for c in cands if c.probability >= threshold]
            t_png = time.perf_counter()
            pngs = []
            if png:
                from nodulekit.detect.render import render_nodule

                for k, cand in enumerate(nodules[:max_png]):
                    png_path = out_dir / "png" / f"{ct.seriesuid}_{k}.png"
                    pngs.append(str(render_nodule(ct, res["labels"], cand, png_path)))
            timings = {"read": read_s, **res["timings_s"], "png": time.perf_counter() - t_png}
            timings["total"] = read_s + time.perf_counter() - t_scan
            scans.append({
                "seriesuid": ct.seriesuid,
                "input": item,
                "geometry": _geometry(ct),
                "lung_ml": round(res["lung_ml"], 1),
                "slices_segmented": res["slices_segmented"],
                "timings_s": {k: round(v, 3) for k, v in timings.items()},
                "n_candidates": len(cands),
                "candidates": [c.to_dict() for c in cands],
                "nodules": [{**c.to_dict(), "png": pngs[k] if k < len(pngs) else None}
                            for k, c in enumerate(nodules)],
            })
            log.info("%s: %d slices, %d candidates, %d above %.2f, %.1f s", ct.seriesuid,
                     res["slices_segmented"], len(cands), len(nodules), threshold, timings["total"])
            del ct, res
            t_read = time.perf_counter()

    total_s = time.perf_counter() - t_all
    summary = {
        "scans_ok": len(scans),
        "scans_failed": len(failed),
        "failed": failed,
        "n_candidates": sum(s["n_candidates"] for s in scans),
        "n_nodules": sum(len(s["nodules"]) for s in scans),
        "seconds_per_scan": round(total_s / len(scans), 3) if scans else None,
        "total_s": round(total_s, 3),
        "settings": {"seg": str(seg), "cls": str(cls), "backend": backend, "cls_backend": cls_backend,
                     "threshold": threshold, "seg_threshold": seg_threshold, "batch_size": batch_size,
                     "threads": threads, "min_volume_mm3": min_volume_mm3, "max_png": max_png},
        "csv": str(csv_path),
        "json": str(json_path),
    }
    json_path.write_text(json.dumps({**summary, "scans": scans}, indent=1))
    log.info("%d scans ok, %d failed, %d candidates, %d nodules >= %.2f, %s s per scan -> %s",
             summary["scans_ok"], summary["scans_failed"], summary["n_candidates"], summary["n_nodules"],
             threshold, summary["seconds_per_scan"], out_dir)
    return {**summary, "scans": scans}
