"""The detection app: CT scans in, a table of nodules with probabilities and pictures out.

Per scan: lung mask -> segmentation of the slices holding lung -> threshold and clean-up inside
the lung -> 3D components as candidates -> classifier on a crop around each -> rows of
``nodules.csv`` (every candidate, so FROC can sweep the threshold), an entry of ``nodules.json``
and a PNG for each candidate above the threshold; on request a scan viewer (``viewer/``), DICOM SEG
and SR (``dicom/``) and a NIfTI label map (``nifti/``).

A run never loses the results of an earlier one, nor leaves files that disagree: the PNGs are drawn
into a hidden staging folder, and the table, the JSON and the output folders replace the earlier ones
together at the end (with ``.incomplete`` marking the folder during those few renames). A killed
run leaves the earlier results as they were; a run in which every scan fails leaves them too. A
scan that cannot be read, or on which a model gives NaN/Inf, is reported and skipped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nodulekit import CLS_THRESHOLD, SEG_THRESHOLD
from nodulekit.detect.candidates import (MIN_DIAMETER_MM, MIN_VOLUME_MM3, VIEW_MEAN, VIEWS, VIEWS_FROM, borders_lung,
                                         check_views, classify, clean_mask, find_candidates, segment_slices)
from nodulekit.detect.lung_mask import lung_masks, lung_volume_ml
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("detect")

CSV_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm")
MIN_SLICES = 7  # the segmentation input is a slice with 3 neighbours on each side
OUTPUT_DIRS = ("png", "viewer", "dicom", "nifti")  # replaced together with the table and the JSON
OUTPUTS = ("nodules.csv", "nodules.json", *OUTPUT_DIRS)
INCOMPLETE = ".incomplete"  # present while a run swaps its outputs in: the folder's files may disagree
_STAGING = ".staging-"


class NonFiniteOutput(RuntimeError):
    """A model gave NaN or Inf: its weights (or the runtime) are broken, the scan's result is void."""


class _Checked:
    """A runner whose outputs must be finite; other attributes (``crop_spacing``) pass through."""

    def __init__(self, runner, what: str):
        self._runner, self._what = runner, what

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def __call__(self, x):
        y = self._runner(x)
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(y))))
        if bad:
            raise NonFiniteOutput(f"the {self._what} gave {bad} NaN/Inf output(s); are its weights finite?")
        return y


def detect_scan(ct, seg_runner, cls_runner, *, seg_threshold: float = SEG_THRESHOLD, batch_size: int = 4,
                min_volume_mm3: float = MIN_VOLUME_MM3, min_diameter_mm: float = MIN_DIAMETER_MM,
                views: int = VIEWS, views_from: float = VIEWS_FROM, view_mean: str = VIEW_MEAN,
                progress: bool = False) -> dict:
    """Detect nodule candidates in one scan and classify them.

    Args:
        ct: a :class:`~nodulekit.data.volume.CTVolume`.
        seg_runner: ``(N, 7, H, W) -> (N, 1, H, W)`` probabilities.
        cls_runner: ``(N, 1, 32, 48, 48) -> (N,)`` nodule probabilities; its ``crop_spacing``
            attribute (if any) sets the crops' voxel size. ``None``: candidates only, unclassified.
        seg_threshold: segmentation probability threshold.
        batch_size: slices per segmentation call.
        min_volume_mm3: smallest component kept as a candidate.
        min_diameter_mm: smallest volume-equivalent diameter of a candidate (one blob of a split
            component included).
        views, views_from, view_mean: a candidate whose crop scores ``views_from`` or more is scored
            as the ``view_mean`` over ``views`` mirror images of it
            (:func:`~nodulekit.detect.candidates.classify`).
        progress: show a progress bar over the segmented slices.

    Returns:
        ``{"candidates": [Finding], "labels": label volume, "lung_ml", "off_lung", "slices_segmented",
        "timings_s": {...}}``; ``off_lung`` counts the components dropped for lying away from the
        lung (:func:`~nodulekit.detect.candidates.borders_lung`), which stay in ``labels``.
    """
    from tqdm import tqdm

    timings = {}
    t = time.perf_counter()
    aerated, lung = lung_masks(ct.hu, ct.spacing)
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
    t = time.perf_counter()
    found = find_candidates(ct.hu, labels, n, ct)
    # too small to be a nodule; or a mark that began at the lung's edge and ran into the
    # mediastinum or the chest wall
    found = [c for c in found if c.diameter_mm >= min_diameter_mm]
    candidates = [c for c in found if borders_lung(c, aerated, ct.spacing)]
    del aerated
    timings["candidates"] = time.perf_counter() - t

    if cls_runner is not None:
        t = time.perf_counter()
        classify(ct, candidates, cls_runner, views=views, views_from=views_from, view_mean=view_mean,
                 timings=timings)
        timings["classification"] = time.perf_counter() - t
    return {
        "candidates": candidates,
        "labels": labels,
        "lung_ml": lung_volume_ml(lung, ct.spacing),
        "off_lung": len(found) - len(candidates),
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


def csv_row(uid: str, cand) -> list[str]:
    """A finding as a row of ``nodules.csv`` (:data:`CSV_COLUMNS`)."""
    x, y, z = cand.center_xyz
    return [uid, f"{x:.3f}", f"{y:.3f}", f"{z:.3f}", f"{cand.probability:.6f}", f"{cand.diameter_mm:.2f}"]


def write_nodules_csv(path: Path, rows: list) -> None:
    """``nodules.csv``: the header and ``rows`` (:func:`csv_row`), written atomically."""
    from nodulekit.io import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)

    atomic_write(path, write)


def run_detection(
    inputs: Iterable[str | Path],
    seg: str | Path | None,
    cls: str | Path | None,
    out_dir: str | Path,
    *,
    backend: str = "torch",
    cls_backend: str = "torch",
    cls_int8: bool = False,
    threshold: float = CLS_THRESHOLD,
    seg_threshold: float = SEG_THRESHOLD,
    batch_size: int = 4,
    threads: int = 2,
    min_volume_mm3: float = MIN_VOLUME_MM3,
    min_diameter_mm: float = MIN_DIAMETER_MM,
    views: int = VIEWS,
    views_from: float = VIEWS_FROM,
    view_mean: str = VIEW_MEAN,
    png: bool = True,
    max_png: int | None = None,
    progress: bool | None = None,
    allow_external_data: bool = False,
    html: bool = False,
    dicom_seg: bool = False,
    dicom_sr: bool = False,
    nifti: bool = False,
) -> dict:
    """Detect nodules in CT scans and write ``nodules.csv``, ``nodules.json`` and PNGs.

    Args:
        inputs: scan files (``.mhd``, ``.nii.gz``), DICOM folders or LUNA16 subset folders.
        seg: segmentation checkpoint (nodulekit or dlwpt) or ``.onnx`` file; None: the weights
            shipped with the package (:mod:`nodulekit.models.shipped`, hash checked).
        cls: classifier checkpoint or ``.onnx`` file; None: the shipped one.
        out_dir: output folder (created).
        backend: runtime of the segmentation model (``torch``, ``onnx``).
        cls_backend: runtime of the classifier.
        cls_int8: run a classifier checkpoint as its int8 OpenVINO form, calibrated once on
            synthetic crops and cached (:func:`nodulekit.deploy.runtime.cached_export`); needs
            ``cls_backend`` ``auto`` or ``openvino``.
        threshold: classifier probability from which a candidate is reported as a nodule.
        seg_threshold: segmentation probability threshold.
        batch_size: slices per segmentation call.
        threads: CPU threads of the runtimes.
        min_volume_mm3: smallest segmented component kept as a candidate.
        min_diameter_mm: smallest candidate's volume-equivalent diameter.
        views: mirror images of a likely candidate's crop the classifier averages (1, 2, 4 or 8).
        views_from: classifier probability of the plain crop from which ``views`` are averaged.
        view_mean: how the views are averaged, ``geometric`` (the mean of their log-probabilities)
            or ``arithmetic`` (:func:`~nodulekit.detect.candidates.pool_views`).
        png: write ``png/<uid>_<k>.png`` for each nodule above ``threshold``.
        max_png: draw at most this many per scan, the most probable first (None: all).
        progress: progress bars; default: when stderr is a terminal.
        allow_external_data: read MetaImage data files outside their header's folder.
        html: write ``viewer/<uid>.html``, a self-contained scan viewer (:mod:`nodulekit.detect.viewer`).
        dicom_seg: for a DICOM series, write ``dicom/<uid>_seg.dcm`` (one segment per nodule);
            for a MetaImage or NIfTI scan, the NIfTI label map instead (as ``nifti``).
        dicom_sr: for a DICOM series, write ``dicom/<uid>_sr.dcm`` (TID 1500 measurement report);
            for a MetaImage or NIfTI scan, the NIfTI label map instead.
        nifti: write ``nifti/<uid>_labels.nii.gz``, nodule ``k`` of ``nodules.json`` as label ``k + 1``.

    Returns:
        Summary: ``scans_ok``, ``scans_failed``, ``failed`` (``[{"input", "error"}]``),
        ``n_candidates``, ``n_nodules``, ``seconds_per_scan``, ``csv``, ``json``, ``scans``, and
        ``written`` (False when every scan failed and ``out_dir`` kept an earlier run's results).

    Raises:
        InputError: a model file cannot be loaded. Bad scans, and scans a runtime fails on (or
            gives NaN/Inf on), are reported in ``failed`` and skipped instead.
        ValueError: an option out of range.
    """
    from tqdm import tqdm

    from nodulekit.data.ct import iter_ct_inputs
    from nodulekit.deploy.runtime import load_cls_runner, load_seg_runner

    _check_options(threshold, seg_threshold, batch_size, threads, min_volume_mm3, max_png, min_diameter_mm)
    check_views(views, views_from, view_mean)  # here, not in the scan loop, which reports a scan's error and goes on
    if seg is None or cls is None:
        from nodulekit.models.shipped import shipped_model

        # a shipped file stands in only for the model not given, so one of them can be swapped
        seg = shipped_model("seg") if seg is None else seg
        cls = shipped_model("cls") if cls is None else cls
    if progress is None:
        progress = sys.stderr.isatty()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_results(out_dir)
    seg_runner = _Checked(load_seg_runner(seg, backend=backend, threads=threads), f"segmentation model {seg}")
    cls_runner = _Checked(load_cls_runner(cls, backend=cls_backend, threads=threads, int8=cls_int8),
                          f"classifier {cls}")
    crop_spacing = getattr(cls_runner, "crop_spacing", None)
    log.info("seg %s (%s), cls %s (%s%s, crops at %s), %d threads", seg, backend, cls, cls_backend,
             " int8" if cls_int8 else "",
             "native voxels" if crop_spacing is None else "x".join(f"{v:g}" for v in crop_spacing) + " mm",
             threads)

    csv_path, json_path = out_dir / "nodules.csv", out_dir / "nodules.json"
    scans, failed, rows = [], [], []
    used: dict[str, str] = {}  # seriesuid -> the input that has it
    t_all = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=out_dir))
    renderer = None
    try:
        items = iter_ct_inputs(inputs, min_slices=MIN_SLICES, allow_external_data=allow_external_data)
        t_read = time.perf_counter()
        for item, ct in tqdm(items, desc="scans", unit="scan", disable=not progress):
            read_s = time.perf_counter() - t_read
            if isinstance(ct, InputError):
                msg = " ".join(str(ct).split())
                log.warning("SKIP %s", msg)
                failed.append({"input": item, "error": msg})
                t_read = time.perf_counter()
                continue
            _unique_uid(ct, item, used)
            t_scan = time.perf_counter()
            try:
                res = detect_scan(ct, seg_runner, cls_runner, seg_threshold=seg_threshold, batch_size=batch_size,
                                  min_volume_mm3=min_volume_mm3, min_diameter_mm=min_diameter_mm,
                                  views=views, views_from=views_from, view_mean=view_mean,
                                  progress=progress)
            except Exception as exc:  # noqa: BLE001 - one scan a runtime cannot take must not stop the batch
                what = str(exc) if isinstance(exc, NonFiniteOutput) else f"{type(exc).__name__}: {exc}"
                msg = " ".join(f"{item}: {what}".split())
                log.warning("FAILED %s", msg)
                failed.append({"input": item, "seriesuid": ct.seriesuid, "error": msg})
                t_read = time.perf_counter()
                continue
            cands = sorted(res["candidates"], key=lambda c: -c.probability)
            rows.extend(csv_row(ct.seriesuid, c) for c in cands)
            nodules = [c for c in cands if c.probability >= threshold]
            t_png = time.perf_counter()
            pngs = []
            if png and nodules and max_png != 0:
                if renderer is None:
                    from nodulekit.detect.render import NoduleRenderer

                    renderer = NoduleRenderer()  # one figure for every scan's pictures
                for k, cand in enumerate(nodules[:max_png]):
                    name = f"{ct.seriesuid}_{k}.png"
                    renderer.render(ct, res["labels"], cand, staging / "png" / name)
                    pngs.append(str(out_dir / "png" / name))
            timings = {"read": read_s, **res["timings_s"], "png": time.perf_counter() - t_png}
            t_out = time.perf_counter()
            links = _scan_outputs(ct, res["labels"], cands, nodules, staging, out_dir, threshold=threshold,
                                  html=html, dicom_seg=dicom_seg, dicom_sr=dicom_sr, nifti=nifti)
            if links:
                timings["outputs"] = time.perf_counter() - t_out
            timings["total"] = read_s + time.perf_counter() - t_scan
            scans.append({
                "seriesuid": ct.seriesuid,
                "input": item,
                "geometry": _geometry(ct),
                "lung_ml": round(res["lung_ml"], 1),
                "slices_segmented": res["slices_segmented"],
                "timings_s": {k: round(v, 3) for k, v in timings.items()},
                "n_candidates": len(cands),
                "n_off_lung": res["off_lung"],
                "candidates": [c.to_dict() for c in cands],
                "nodules": [{**c.to_dict(), "png": pngs[k] if k < len(pngs) else None, **_nodule_links(links, c, k)}
                            for k, c in enumerate(nodules)],
                **links,
            })
            log.info("%s: %d slices, %d candidates, %d above %.2f, %.1f s", ct.seriesuid,
                     res["slices_segmented"], len(cands), len(nodules), threshold, timings["total"])
            del ct, res
            t_read = time.perf_counter()

        total_s = time.perf_counter() - t_all
        summary = _summary(scans, failed, total_s, csv_path, json_path, seg=str(seg), cls=str(cls), backend=backend,
                           cls_backend=cls_backend, cls_int8=cls_int8, threshold=threshold, seg_threshold=seg_threshold,
                           batch_size=batch_size, threads=threads, min_volume_mm3=min_volume_mm3,
                           min_diameter_mm=min_diameter_mm, views=views, views_from=views_from, view_mean=view_mean,
                           max_png=max_png)
        summary["written"] = bool(scans) or not earlier
        if summary["written"]:
            _commit(out_dir, staging, rows, {**summary, "scans": scans})
        else:
            log.info("%s: every input failed; the earlier results there (%s) are left as they were",
                        out_dir, ", ".join(earlier))
    finally:
        if renderer is not None:
            renderer.close()
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%d scans ok, %d failed, %d candidates, %d nodules >= %.2f, %s s per scan -> %s",
             summary["scans_ok"], summary["scans_failed"], summary["n_candidates"], summary["n_nodules"],
             threshold, summary["seconds_per_scan"], out_dir)
    return {**summary, "scans": scans}


def _summary(scans: list, failed: list, total_s: float, csv_path: Path, json_path: Path, **settings) -> dict:
    return {
        "scans_ok": len(scans),
        "scans_failed": len(failed),
        "failed": failed,
        "n_candidates": sum(s["n_candidates"] for s in scans),
        "n_nodules": sum(len(s["nodules"]) for s in scans),
        "seconds_per_scan": round(total_s / len(scans), 3) if scans else None,
        "total_s": round(total_s, 3),
        "settings": settings,
        "csv": str(csv_path),
        "json": str(json_path),
    }


def _check_options(threshold, seg_threshold, batch_size, threads, min_volume_mm3, max_png, min_diameter_mm) -> None:
    for name, value in (("threshold", threshold), ("seg_threshold", seg_threshold)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    for name, value in (("batch_size", batch_size), ("threads", threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    for name, value in (("min_volume_mm3", min_volume_mm3), ("min_diameter_mm", min_diameter_mm)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {value}")
    if max_png is not None and max_png < 0:
        raise ValueError(f"max_png must be non-negative or None, got {max_png}")


def _earlier_results(out_dir: Path) -> list[str]:
    """The outputs an earlier run left in ``out_dir`` (said once); stale staging folders of killed
    runs are removed."""
    for old in out_dir.glob(f"{_STAGING}*"):
        pid = old.name[len(_STAGING):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    if (out_dir / INCOMPLETE).exists():
        log.warning("%s: warning: an earlier run was cut while replacing its results (%s is there); its files "
                    "may disagree until this run replaces them", out_dir, INCOMPLETE)
    earlier = [name for name in OUTPUTS if (out_dir / name).exists()]
    if earlier:
        log.info("%s holds the results of an earlier run (%s): replaced at the end, if a scan succeeds",
                 out_dir, ", ".join(earlier))
    return earlier


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(out_dir: Path, staging: Path, rows: list, report: dict) -> None:
    """Move this run's outputs into ``out_dir`` in place of the earlier ones: each file through
    :func:`nodulekit.io.atomic_write`, the PNG folder by rename, ``.incomplete`` marking the few
    renames in between."""
    from nodulekit.io import atomic_write_text

    marker = out_dir / INCOMPLETE
    atomic_write_text(marker, "a detect run was replacing nodules.csv, nodules.json and its folders here\n")
    for name in OUTPUT_DIRS:
        old, new = out_dir / name, staging / name
        if old.exists():
            old.rename(staging / f"{name}.old")
        if new.exists():
            new.rename(old)
    write_nodules_csv(out_dir / "nodules.csv", rows)
    atomic_write_text(out_dir / "nodules.json", json.dumps(report, indent=1))
    marker.unlink()


def _scan_outputs(ct, labels, cands: list, nodules: list, staging: Path, out_dir: Path, *, threshold: float,
                  html: bool, dicom_seg: bool, dicom_sr: bool, nifti: bool) -> dict:
    """Write the scan's viewer, DICOM SEG/SR and NIfTI label map (as asked) into ``staging``; returns
    ``nodules.json``'s links to them (paths as they will be in ``out_dir``). A writer that fails is
    reported in ``output_errors``; the scan's detection stands."""
    from nodulekit.detect.pacs import MAX_SEGMENTS, is_dicom_source, write_dicom, write_nifti_labels

    uid, links, errors = ct.seriesuid, {}, []
    dicom = is_dicom_source(ct)
    if (dicom_seg or dicom_sr) and not dicom:
        log.info("%s: not a DICOM series: the NIfTI label map stands in for the DICOM SEG/SR", ct.source)
        nifti = True
    if len(nodules) > MAX_SEGMENTS and (dicom_seg or dicom_sr):
        log.warning("%s: %d nodules; the DICOM SEG/SR hold the %d most probable", uid, len(nodules),
                    MAX_SEGMENTS)

    def attempt(what: str, write) -> None:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - an output that cannot be written must not void the scan
            msg = " ".join(f"{ct.source}: {what}: {exc if isinstance(exc, InputError) else repr(exc)}".split())
            log.warning("OUTPUT FAILED %s", msg)
            errors.append(msg)

    if html:
        from nodulekit.detect.viewer import write_viewer

        def viewer():
            write_viewer(ct, labels, cands, staging / "viewer" / f"{uid}.html", threshold=threshold)
            links["viewer"] = str(out_dir / "viewer" / f"{uid}.html")
        attempt("viewer", viewer)
    if dicom and (dicom_seg or dicom_sr):
        def dicom_objects():
            for key, path in write_dicom(ct, labels, nodules, staging / "dicom", seg=dicom_seg,
                                              sr=dicom_sr).items():
                if (key == "dicom_seg" and dicom_seg) or (key == "dicom_sr" and dicom_sr):
                    links[key] = path and str(out_dir / "dicom" / Path(path).name)
        attempt("DICOM SEG/SR", dicom_objects)
    if nifti:
        def label_map():
            name = f"{uid}_labels.nii.gz"
            write_nifti_labels(ct, labels, nodules, staging / "nifti" / name)
            links["nifti"] = str(out_dir / "nifti" / name)
        attempt("NIfTI label map", label_map)
    if errors:
        links["output_errors"] = errors
    return links


def _nodule_links(links: dict, cand, k: int) -> dict:
    """A nodule's own links: the viewer at its slice, and its label in the SEG / NIfTI label map."""
    out = {}
    if links.get("viewer"):
        out["viewer"] = f"{links['viewer']}#slice={int(round(cand.center_irc[0]))}"
    if links.get("dicom_seg") or links.get("nifti"):
        out["segment"] = k + 1
    return out


def _unique_uid(ct, item: str, used: dict[str, str]) -> None:
    """Give ``ct`` a seriesuid no earlier input of this run has (``uid-2``, ``uid-3``...): two
    ``slab.mhd`` in different folders would share PNGs and rows otherwise."""
    uid, k = ct.seriesuid, 2
    while ct.seriesuid in used:
        ct.seriesuid = f"{uid}-{k}"
        k += 1
    if ct.seriesuid != uid:
        log.warning("%s: warning: seriesuid %s is already used by %s in this run; written as %s",
                    item, uid, used[uid], ct.seriesuid)
    used[ct.seriesuid] = item
