"""Training candidates from the detector itself: its false positives, as negatives for the classifier.

LUNA16's ``candidates_V2.csv`` lists what several CAD systems proposed, so a classifier trained on
it meets, in training, the kind of false positive it will have to reject. Another dataset's
candidates table (the synthetic one's included) lists non-nodules picked by other rules, and the
classifier then first meets the segmentation's own proposals at detection time. ``mine_candidates``
runs the trained segmentation over training scans, exactly as ``nodulekit detect`` does up to the
candidates, and writes what it finds as a candidates table: class 0 for each candidate away from
every annotated and excluded finding; candidates near a finding are left out (a candidate at a
nodule's edge is neither a clean positive nor a clean negative).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nodulekit import SEG_THRESHOLD
from nodulekit.detect.candidates import MIN_VOLUME_MM3
from nodulekit.log import get_logger

log = get_logger("detect")


def clear_of_findings(center_xyz, findings: Sequence[tuple[np.ndarray, float]]) -> bool:
    """Whether a point lies farther than ``max(1.5 r, r + 4 mm)`` from every ``(centre, radius)``."""
    p = np.asarray(center_xyz, dtype=np.float64)
    return all(np.linalg.norm(p - c) > max(1.5 * r, r + 4.0) for c, r in findings)


def _window(ct, max_slices: int | None):
    """The middle ``max_slices`` slices of a scan as a volume of its own (the whole scan if fewer)."""
    from nodulekit.data.volume import CTVolume

    depth = ct.shape[0]
    if not max_slices or depth <= max_slices:
        return ct
    z0 = (depth - max_slices) // 2
    origin = tuple(float(v) for v in ct.voxel_to_world(np.array([[z0, 0, 0]], dtype=np.float64))[0])
    return CTVolume(ct.hu[z0:z0 + max_slices], origin, ct.spacing, ct.direction, seriesuid=ct.seriesuid,
                    source=ct.source)


def mine_candidates(
    data_dir: str | Path,
    seg: str | Path,
    out_csv: str | Path,
    *,
    uids: Sequence[str] | None = None,
    backend: str = "torch",
    threads: int = 2,
    max_slices: int | None = None,
    batch_size: int = 4,
    threshold: float = SEG_THRESHOLD,
    min_volume_mm3: float = MIN_VOLUME_MM3,
    min_diameter_mm: float = 0.0,
    progress: bool = True,
) -> dict:
    """Segment scans of a LUNA16-layout folder and write the non-nodule candidates found.

    Args:
        data_dir: folder with ``subset*/`` and ``annotations.csv`` (``annotations_excluded.csv``
            too, if present: candidates near those are left out as well).
        seg: segmentation checkpoint or ``.onnx`` file.
        out_csv: candidates table to write (``seriesuid,coordX,coordY,coordZ,class``, all class 0).
        uids: the scans to segment (default: all); never the ones the classifier is validated on.
        backend: runtime of the segmentation model (``torch``, ``onnx``, ``openvino``, or ``auto``
            as the CLI's default: :func:`nodulekit.deploy.runtime.resolve_backend`).
        threads: CPU threads of the runtime.
        max_slices: segment only the middle ``max_slices`` slices of each scan (``None``: all),
            to bound the time on thin-slice scans.
        batch_size: slices per segmentation call.
        threshold: segmentation probability from which a pixel is marked, as detection's
            ``seg_threshold`` (the same value gives the candidates detection proposes).
        min_volume_mm3: smallest component kept, as in detection.
        min_diameter_mm: smallest candidate kept; by default none is dropped, not even what is
            below detection's floor (``MIN_DIAMETER_MM``): the specks and thin vessel
            cross-sections there are negatives the classifier learns from.
        progress: progress bar over the scans.

    Returns:
        ``scans_ok``, ``failed`` (``[{"seriesuid", "error"}]``), ``candidates`` (all found),
        ``negatives`` (written), ``near_findings`` (left out), ``seconds``, ``csv``.

    Raises:
        InputError: no annotations table, or a seriesuid not in the folder.
    """
    from tqdm import tqdm

    from nodulekit.data.ct import read_ct
    from nodulekit.data.luna import Candidate, annotations_by_series, read_annotations, select_series, write_candidates
    from nodulekit.deploy.runtime import load_seg_runner
    from nodulekit.detect.pipeline import MIN_SLICES, detect_scan

    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    series = select_series(data_dir, uids)
    findings = read_annotations(data_dir / "annotations.csv")
    if (data_dir / "annotations_excluded.csv").is_file():
        findings += read_annotations(data_dir / "annotations_excluded.csv", unknown_diameter_mm=10.0)
    by_uid = {uid: [(np.asarray(a.center_xyz, dtype=np.float64), max(a.diameter_mm, 0.0) / 2) for a in rows]
              for uid, rows in annotations_by_series(findings).items()}
    runner = load_seg_runner(seg, backend=backend, threads=threads)

    ok, found, negatives, failed = 0, 0, [], []
    for uid in tqdm(series, desc="mine", unit="scan", disable=not progress):
        try:
            ct = _window(read_ct(series[uid], min_slices=MIN_SLICES), max_slices)
            res = detect_scan(ct, runner, None, seg_threshold=threshold, batch_size=batch_size,
                              min_volume_mm3=min_volume_mm3, min_diameter_mm=min_diameter_mm)
        except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the others
            msg = f"{series[uid]}: {type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("SKIP %s", msg)
            failed.append({"seriesuid": uid, "error": msg})
            continue
        ok += 1
        found += len(res["candidates"])
        negatives += [Candidate(uid, tuple(float(v) for v in c.center_xyz), False) for c in res["candidates"]
                      if clear_of_findings(c.center_xyz, by_uid.get(uid, ()))]
    out_csv = write_candidates(out_csv, negatives)
    summary = {"scans_ok": ok, "failed": failed, "candidates": found, "negatives": len(negatives),
               "near_findings": found - len(negatives), "seconds": round(time.perf_counter() - t0, 1),
               "csv": str(out_csv)}
    log.info("mined %d scans: %d candidates, %d non-nodules written, %d near a finding left out (%.0f s) -> %s",
             ok, found, len(negatives), found - len(negatives), summary["seconds"], out_csv)
    return summary
