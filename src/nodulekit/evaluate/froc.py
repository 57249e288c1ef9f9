"""LUNA16 FROC: sensitivity at 1/8 .. 8 false positives per scan, CPM, and a bootstrap CI over scans.

Protocol (as the LUNA16 evaluation script, ``noduleCADEvaluationLUNA16.py``):

- Only the scans of ``seriesuids.csv`` count; each keeps its ``max_marks`` most probable marks.
- A mark hits a finding when its distance to the finding's centre is at most the finding's radius.
  A finding of ``annotations_excluded.csv`` without a size (diameter -1) gets a 10 mm diameter.
- Each nodule hit by marks is one true positive with the highest probability among them; its other
  hits are neither true nor false positives. Marks on excluded findings are ignored. Every other
  mark is a false positive. Nodules without a hit lower the sensitivity at every threshold.
- The FROC curve (false positives per scan, sensitivity) has a point per distinct probability and is
  linearly interpolated at the seven rates; beyond its last point it stays at its last sensitivity.
  CPM is the mean of the seven sensitivities.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulekit import CLS_THRESHOLD
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("evaluate")

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_MARKS = 100
EXCLUDED_UNKNOWN_DIAMETER_MM = 10.0
# the ``within_loss`` operating point: the fewest false positives that lose at most this much sensitivity
MAX_SENSITIVITY_LOSS = 0.05
N_BOOTSTRAP = 1000  # bootstrap samples of the CPM's 95 % CI


@dataclass
class ScanResult:
    """Outcome of matching one scan's marks against its findings.

    Attributes:
        tp_probs: per detected nodule, the highest probability among the marks that hit it.
        fp_probs: probabilities of the false-positive marks.
        n_nodules: included nodules of the scan (detected or not).
        n_marks: marks evaluated (after the ``max_marks`` cap).
        n_ignored_excluded: marks ignored because they hit an excluded finding only.
        n_ignored_duplicates: extra hits on an already hit nodule.
    """

    tp_probs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fp_probs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_nodules: int = 0
    n_marks: int = 0
    n_ignored_excluded: int = 0
    n_ignored_duplicates: int = 0


def read_detections(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a CAD marks table (LUNA16 submission format, see :func:`nodulekit.data.luna.read_marks`).

    Returns:
        ``{uid: (centers (N, 3) mm, probabilities (N,))}`` in file order.
    """
    from nodulekit.data.luna import read_marks

    rows = defaultdict(list)
    for mark in read_marks(path):
        rows[mark.seriesuid].append((*mark.center_xyz, mark.probability))
    return {uid: (np.array(r)[:, :3], np.array(r)[:, 3]) for uid, r in rows.items()}


def _read_findings(path, allow_unknown_size: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{uid: (centers (N, 3), radii (N,))}`` from an annotations table."""
    from nodulekit.data.luna import read_annotations

    unknown = EXCLUDED_UNKNOWN_DIAMETER_MM if allow_unknown_size else None
    rows = defaultdict(list)
    for ann in read_annotations(path, unknown_diameter_mm=unknown):
        rows[ann.seriesuid].append((*ann.center_xyz, ann.diameter_mm / 2.0))
    return {uid: (np.array(r)[:, :3], np.array(r)[:, 3]) for uid, r in rows.items()}


def _hits(centers: np.ndarray, find_centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``(marks, findings)`` bool: distance <= radius (a hair of tolerance for rounding)."""
    d2 = ((centers[:, None, :] - find_centers[None, :, :]) ** 2).sum(axis=2)
    r2 = radii[None, :] ** 2
    return d2 <= r2 + 1e-9 * np.maximum(r2, 1.0)


def match_scan(centers, probs, nodules=None, excluded=None, *, max_marks: int | None = MAX_MARKS) -> ScanResult:
    """Match one scan's marks against its nodules and excluded findings.

    Args:
        centers: ``(N, 3)`` mark positions (x, y, z) mm.
        probs: ``(N,)`` mark probabilities.
        nodules: ``(centers (M, 3), radii (M,))`` of the included nodules, or None.
        excluded: ``(centers (K, 3), radii (K,))`` of the findings to ignore, or None.
        max_marks: keep only this many most probable marks (ties: file order); None keeps all.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if max_marks is not None and len(probs) > max_marks:
        keep = np.argsort(-probs, kind="stable")[:max_marks]
        centers, probs = centers[keep], probs[keep]
    n = len(probs)
    used = np.zeros(n, dtype=bool)
    tp, duplicates, n_nodules = [], 0, 0
    if nodules is not None and len(nodules[1]):
        n_nodules = len(nodules[1])
        if n:
            hit = _hits(centers, *nodules)
            for j in range(n_nodules):
                idx = np.flatnonzero(hit[:, j])
                if len(idx):
                    tp.append(probs[idx].max())
                    duplicates += len(idx) - 1
            used = hit.any(axis=1)
    ignored = np.zeros(n, dtype=bool)
    if excluded is not None and len(excluded[1]) and n:
        ignored = _hits(centers, *excluded).any(axis=1) & ~used
    fp = ~used & ~ignored
    return ScanResult(np.array(tp, dtype=np.float64), probs[fp], n_nodules, n,
                      int(ignored.sum()), duplicates)


def froc_curve(results: list[ScanResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FROC curve over scans: ``(fps_per_scan, sensitivity, thresholds)``, starting at (0, 0)
    with one point per distinct probability, in decreasing probability."""
    return _curve(results, np.ones(len(results)))


def _entries(results: list[ScanResult]):
    probs = np.concatenate([np.zeros(0)] + [np.concatenate([r.tp_probs, r.fp_probs]) for r in results])
    is_tp = np.concatenate([np.zeros(0, bool)] + [np.r_[np.ones(len(r.tp_probs), bool), np.zeros(len(r.fp_probs), bool)]
                                                   for r in results])
    scan = np.concatenate([np.zeros(0, int)] + [np.full(len(r.tp_probs) + len(r.fp_probs), i)
                                                 for i, r in enumerate(results)])
    order = np.argsort(-probs, kind="stable")
    probs, is_tp, scan = probs[order], is_tp[order], scan[order]
    # last entry of each run of equal probabilities: one curve point per distinct threshold
    ends = np.flatnonzero(np.r_[probs[1:] != probs[:-1], True]) if len(probs) else np.zeros(0, int)
    return probs, is_tp, scan, ends


def _curve(results, weights, entries=None):
    probs, is_tp, scan, ends = entries or _entries(results)
    n_nodules = float(np.dot(weights, [r.n_nodules for r in results]))
    w = weights[scan]
    tps = np.cumsum(w * is_tp)[ends]
    fps = np.cumsum(w * ~is_tp)[ends]
    n_scans = float(weights.sum())
    sens = tps / n_nodules if n_nodules > 0 else np.full(len(tps), np.nan)
    return (np.r_[0.0, fps / n_scans], np.r_[0.0 if n_nodules > 0 else np.nan, sens],
            np.r_[np.inf, probs[ends]])


def sensitivity_at(fps: np.ndarray, sens: np.ndarray, rates=FP_RATES) -> np.ndarray:
    """Sensitivity at the given false-positive rates, interpolated linearly on the curve (at a rate
    the curve crosses vertically, the highest sensitivity)."""
    return np.interp(np.asarray(rates, dtype=np.float64), fps, sens)


def operating_point(results: list[ScanResult], threshold: float | None) -> dict:
    """Sensitivity and false positives per scan of the marks with probability >= ``threshold``
    (None: every mark, whatever its probability)."""
    t = -math.inf if threshold is None else threshold
    n_nodules = sum(r.n_nodules for r in results)
    tp = sum(int((r.tp_probs >= t).sum()) for r in results)
    fp = sum(int((r.fp_probs >= t).sum()) for r in results)
    return {
        "threshold": threshold,
        "sensitivity": tp / n_nodules if n_nodules else None,
        "fps_per_scan": fp / len(results) if results else None,
        "true_positives": tp,
        "false_positives": fp,
    }


def fewest_false_positives(results: list[ScanResult], max_loss: float) -> dict | None:
    """The threshold with the fewest false positives per scan whose sensitivity lies at most
    ``max_loss`` below that of every mark (what the classifier must reach: e.g. 10x fewer false
    positives than segmentation alone for at most 5 points of sensitivity); ``fp_reduction`` is how
    many times fewer false positives than every mark (None when none is left). None when no scan
    holds a nodule."""
    n_nodules = sum(r.n_nodules for r in results)
    if not n_nodules:
        return None
    tp = np.sort(np.concatenate([np.zeros(0)] + [r.tp_probs for r in results]))[::-1]
    # the fewest true positives that stay within the loss (a tolerance for 0.05 * n in floats)
    need = max(0, math.ceil((len(tp) / n_nodules - max_loss) * n_nodules - 1e-9))
    threshold = float(tp[need - 1]) if need else math.inf
    point = operating_point(results, threshold)
    every = operating_point(results, None)["false_positives"]
    point.update(max_sensitivity_loss=max_loss, threshold=threshold if need else None,
                 fp_reduction=every / point["false_positives"] if point["false_positives"] else None)
    return point


def bootstrap(results: list[ScanResult], n_bootstrap: int = N_BOOTSTRAP, seed: int = 0, rates=FP_RATES,
              grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample scans with replacement and recompute the curve.

    Returns:
        ``(sens_at_rates (B, len(rates)), sens_on_grid (B, len(grid)))``; rows where a sample holds
        no nodule are NaN.
    """
    grid = np.asarray(FP_RATES if grid is None else grid, dtype=np.float64)
    rng = np.random.default_rng(seed)
    entries = _entries(results)
    n = len(results)
    at_rates = np.full((n_bootstrap, len(rates)), np.nan)
    on_grid = np.full((n_bootstrap, len(grid)), np.nan)
    for b in range(n_bootstrap):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        fps, sens, _ = _curve(results, weights, entries)
        if np.isnan(sens[0]):
            continue
        at_rates[b] = sensitivity_at(fps, sens, rates)
        on_grid[b] = sensitivity_at(fps, sens, grid)
    return at_rates, on_grid


def evaluate_froc(detections_csv, annotations_csv, excluded_csv=None, seriesuids_csv=None, out_dir=None, *,
                  n_bootstrap: int = N_BOOTSTRAP, seed: int = 0, max_marks: int | None = MAX_MARKS,
                  threshold: float = CLS_THRESHOLD, max_sensitivity_loss: float = MAX_SENSITIVITY_LOSS) -> dict:
    """LUNA16 FROC of a CAD marks table.

    Args:
        detections_csv: ``seriesuid,coordX,coordY,coordZ,probability`` (``nodules.csv`` of ``detect``).
        annotations_csv: LUNA16 ``annotations.csv``.
        excluded_csv: ``annotations_excluded.csv``; marks on these findings are ignored.
        seriesuids_csv: the scans evaluated (scans without marks or nodules count too); default: every
            uid of the detections and annotations.
        out_dir: if given, ``froc.json`` and ``froc.png`` are written there.
        n_bootstrap: bootstrap samples over scans for the 95% CIs (0: none).
        seed: bootstrap seed.
        max_marks: most probable marks kept per scan.
        threshold: probability of the classifier operating point reported next to the
            all-candidates point.
        max_sensitivity_loss: the third operating point (``within_loss``) is the threshold with the
            fewest false positives that loses at most this much sensitivity against every mark.

    Returns:
        ``sensitivities`` and ``fps_per_scan`` (7 each), ``cpm``, ``cpm_ci``, ``sensitivities_ci``,
        counts (``n_scans``, ``n_nodules``, ``n_detected``, ``n_detections``, ...), ``operating_points``
        and ``curve`` (the FROC curve sampled on a log grid).

    Raises:
        InputError: a missing or malformed table (naming file and line), a mark on a scan that is not
            in ``seriesuids_csv``, or no scan to evaluate.
        ValueError: an option out of range.
    """
    from nodulekit.data.luna import read_seriesuids

    _check_options(n_bootstrap, max_marks, threshold, max_sensitivity_loss)
    detections = read_detections(detections_csv)
    nodules = _read_findings(annotations_csv, allow_unknown_size=False)
    excluded = _read_findings(excluded_csv, allow_unknown_size=True) if excluded_csv else {}
    if seriesuids_csv:
        uids = list(dict.fromkeys(read_seriesuids(seriesuids_csv)))
    else:
        uids = sorted(set(detections) | set(nodules))
        log.warning("no seriesuids table: evaluating the %d scans named in detections and annotations", len(uids))
    if not uids:
        raise InputError(detections_csv, "no scan to evaluate")
    scans = set(uids)
    outside = [uid for uid in detections if uid not in scans]
    if outside:
        # a scan missing from the list would be scored as no scan at all: say which, don't guess
        raise InputError(detections_csv, f"seriesuid {outside[0]} is not in {seriesuids_csv}"
                                         + (f" (nor {len(outside) - 1} more)" if len(outside) > 1 else ""))

    def match_all(cap):
        empty = (np.zeros((0, 3)), np.zeros(0))
        return [match_scan(*detections.get(uid, empty), nodules.get(uid), excluded.get(uid), max_marks=cap)
                for uid in uids]

    results = match_all(max_marks)
    uncapped = match_all(None)
    fps, sens, _ = froc_curve(results)
    n_nodules = sum(r.n_nodules for r in results)
    if n_nodules == 0:
        log.warning("no nodule in the evaluated scans: sensitivity is undefined")
    at = sensitivity_at(fps, sens)
    grid = np.geomspace(FP_RATES[0], FP_RATES[-1], 97)
    out = {
        "fps_per_scan": list(FP_RATES),
        "sensitivities": _floats(at),
        "cpm": _float(at.mean()),
        "cpm_ci": None,
        "sensitivities_ci": None,
        "confidence": 0.95,
        "n_bootstrap": int(n_bootstrap),
        "seed": seed,
        "max_marks": max_marks,
        "n_scans": len(uids),
        "n_nodules": n_nodules,
        "n_detected": sum(len(r.tp_probs) for r in results),
        "n_detections": sum(r.n_marks for r in results),
        "n_true_positives": sum(len(r.tp_probs) for r in results),
        "n_false_positives": sum(len(r.fp_probs) for r in results),
        "n_ignored_excluded": sum(r.n_ignored_excluded for r in results),
        "n_ignored_duplicates": sum(r.n_ignored_duplicates for r in results),
        "operating_points": {
            "all_candidates": operating_point(uncapped, None),
            "at_threshold": operating_point(results, threshold),
            "within_loss": fewest_false_positives(uncapped, max_sensitivity_loss),
        },
        "curve": {"fps_per_scan": _floats(grid), "sensitivity": _floats(sensitivity_at(fps, sens, grid))},
    }
    if n_bootstrap and n_nodules:
        at_b, grid_b = bootstrap(results, n_bootstrap, seed, FP_RATES, grid)
        cpm_b = at_b.mean(axis=1)
        out["cpm_ci"] = _floats(np.nanpercentile(cpm_b, [2.5, 97.5]))
        out["sensitivities_ci"] = [_floats(v) for v in np.nanpercentile(at_b, [2.5, 97.5], axis=0).T]
        low, high = np.nanpercentile(grid_b, [2.5, 97.5], axis=0)
        out["curve"]["ci_low"], out["curve"]["ci_high"] = _floats(low), _floats(high)
    if out_dir is not None:
        from nodulekit.io import atomic_write_text

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # allow_nan=False: froc.json must stay JSON (NaN is not); every float went through _float
        atomic_write_text(out_dir / "froc.json", json.dumps(out, indent=1, allow_nan=False))
        if n_nodules:
            plot_froc(out, out_dir / "froc.png")
        log.info("CPM %s over %d scans, %d nodules -> %s", out["cpm"], len(uids), n_nodules, out_dir)
    return out


def _check_options(n_bootstrap, max_marks, threshold, max_sensitivity_loss) -> None:
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap}")
    if max_marks is not None and (int(max_marks) != max_marks or max_marks < 1):
        raise ValueError(f"max_marks must be a positive integer or None, got {max_marks}")
    for name, value in (("threshold", threshold), ("max_sensitivity_loss", max_sensitivity_loss)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _float(v) -> float | None:
    v = float(v)
    return None if not math.isfinite(v) else round(v, 6)


def _floats(values) -> list:
    return [_float(v) for v in np.asarray(values).reshape(-1)]


def plot_froc(result: dict, path: str | Path, label: str = "CAD") -> Path:
    """FROC curve of an :func:`evaluate_froc` result on a log x axis, with its bootstrap CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(curve["fps_per_scan"], curve["sensitivity"], lw=2,
            label=f"{label} (CPM {result['cpm']:.3f})" if result["cpm"] is not None else label)
    if "ci_low" in curve:
        ax.fill_between(curve["fps_per_scan"], curve["ci_low"], curve["ci_high"], alpha=0.2, label="95% CI")
    ax.plot(result["fps_per_scan"], result["sensitivities"], "o", color="tab:blue")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(list(FP_RATES), ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_xlim(FP_RATES[0], FP_RATES[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"FROC ({result['n_scans']} scans, {result['n_nodules']} nodules)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
