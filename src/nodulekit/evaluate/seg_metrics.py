"""Segmentation metrics on whole validation slices, for any predictor.

``predict`` maps ``np.float32 (N, 7, H, W)`` to ``(N, 1, H, W)`` probabilities, so a PyTorch model,
an ONNX file and an RKNN model are measured by the same code (see ``nodulekit.deploy.runtime``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nodulekit import SEG_THRESHOLD

SIZE_BIN_MM = 5.0  # nodules under 5 mm are hard and clinically less urgent: reported apart
# A nodule counts as found on a slice where a marked component (4-connected, in the slice) lies at
# least this much on it. "Any of its pixels marked" rewarded over-marking: a model that marks every
# dense structure touches every nodule, yet the nodule is then a sliver of a blob with vessels whose
# centre (the candidate detection reports) falls outside it. A quarter still admits a marked rim as
# wide as the nodule's radius.
FOUND_SHARE = 0.25


def evaluate_seg(predict: Callable[[np.ndarray], np.ndarray], val_ds, threshold: float = SEG_THRESHOLD,
                 batch_size: int = 4, progress: bool = False, pr_bins: int = 0) -> dict:
    """Pixel and nodule-level metrics of a segmentation predictor on a validation dataset.

    Args:
        predict: ``np.float32 (N, 7, H, W) -> (N, 1, H, W)`` probabilities.
        val_ds: a :class:`nodulekit.data.seg_dataset.SegValDataset` (items ``(image, labels,
            scan index)``, attribute ``nodules``).
        threshold: a pixel is predicted nodule when its probability is above this.
        batch_size: slices per ``predict`` call (consecutive slices of one scan).
        progress: show a progress bar.
        pr_bins: when > 0, also return ``pr_hist``: counts of nodule (``pos``) and background
            (``neg``) pixels per probability bin ``[k / pr_bins, (k + 1) / pr_bins)``, from which
            :func:`recall_at_precision` reads recall at any threshold.

    Returns:
        ``recall``, ``precision``, ``dice`` (pixel F1) at ``threshold``; ``nodule_recall`` (a nodule
        is found when, on one of its slices, a predicted component lies at least
        :data:`FOUND_SHARE` on it: :func:`found_nodules`), ``nodule_recall_lt5`` and
        ``nodule_recall_ge5`` by diameter, the counts behind them, and ``slices``. A ratio with an
        empty denominator is NaN.
    """
    from tqdm import tqdm

    tp = fp = fn = 0
    pos_hist, neg_hist = np.zeros(max(pr_bins, 1), np.int64), np.zeros(max(pr_bins, 1), np.int64)
    found: set[tuple[int, int]] = set()
    n = len(val_ds)
    bar = tqdm(total=n, desc="validate", disable=not progress, leave=False)
    start = 0
    while start < n:
        first = val_ds[start]
        images, labels, scan = [first[0]], [first[1]], first[2]
        end = start + 1
        while end < n and end - start < batch_size:
            item = val_ds[end]
            if item[2] != scan or item[0].shape != first[0].shape:
                break
            images.append(item[0])
            labels.append(item[1])
            end += 1
        probs = np.asarray(predict(np.stack(images).astype(np.float32, copy=False)))
        pred = probs[:, 0] > threshold
        lab = np.stack(labels)
        truth = lab > 0
        tp += int(np.count_nonzero(pred & truth))
        fp += int(np.count_nonzero(pred & ~truth))
        fn += int(np.count_nonzero(~pred & truth))
        found.update((int(scan), k) for k in found_nodules(pred, lab))
        if pr_bins > 0:
            bins = np.clip((probs[:, 0] * pr_bins).astype(np.int64), 0, pr_bins - 1)
            pos_hist += np.bincount(bins[truth], minlength=pr_bins)
            neg_hist += np.bincount(bins[~truth], minlength=pr_bins)
        bar.update(end - start)
        start = end
    bar.close()

    def ratio(a, b):
        return a / b if b else float("nan")

    nodules = list(val_ds.nodules)
    small = [(s, k) for s, k, d in nodules if d < SIZE_BIN_MM]
    large = [(s, k) for s, k, d in nodules if not d < SIZE_BIN_MM]
    hits = lambda group: sum((s, k) in found for s, k in group)  # noqa: E731
    extra = {"pr_hist": {"pos": pos_hist.tolist(), "neg": neg_hist.tolist()}} if pr_bins > 0 else {}
    return {
        **extra,
        "recall": ratio(tp, tp + fn),
        "precision": ratio(tp, tp + fp),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "nodule_recall": ratio(hits([(s, k) for s, k, _ in nodules]), len(nodules)),
        "nodule_recall_lt5": ratio(hits(small), len(small)),
        "nodule_recall_ge5": ratio(hits(large), len(large)),
        "nodules": len(nodules),
        "nodules_lt5": len(small),
        "nodules_ge5": len(large),
        "nodules_found": hits([(s, k) for s, k, _ in nodules]),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "slices": n,
    }


def found_nodules(pred: np.ndarray, lab: np.ndarray, share: float = FOUND_SHARE) -> set[int]:
    """Labels ``k`` of ``lab`` (``(N, H, W)``, 0 background) found by the boolean ``pred``: some
    component of ``pred`` within one slice has at least ``share`` of its pixels on label ``k``."""
    from scipy import ndimage

    hit = pred & (lab > 0)
    if not hit.any():
        return set()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # connected within a slice only
    comp, n = ndimage.label(pred, structure=structure)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    pairs, counts = np.unique(np.stack([comp[hit], lab[hit].astype(np.int64)]), axis=1, return_counts=True)
    return {int(k) for (c, k), m in zip(pairs.T, counts) if m >= share * sizes[c]}


def average_precision(pr_hist: dict) -> float:
    """Pixel average precision (the area under the precision-recall curve, as a step sum over the
    thresholds from high to low) from :func:`evaluate_seg`'s ``pr_hist``; NaN without nodule pixels.

    Computed from the binned counts rather than with scikit-learn's ``average_precision_score``,
    which needs every pixel's probability: the histograms are what the evaluation keeps. Unlike
    recall at one threshold, it does not reward marking more, and unlike recall at a fixed precision
    it stays defined for a model that never reaches that precision."""
    pos = np.asarray(pr_hist["pos"], dtype=np.float64)
    neg = np.asarray(pr_hist["neg"], dtype=np.float64)
    if not pos.sum():
        return float("nan")
    tps, fps = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])  # from the highest threshold down
    recall = tps / pos.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def recall_at_precision(pr_hist: dict, precision: float) -> dict:
    """The highest pixel recall whose precision is at least ``precision``, from :func:`evaluate_seg`'s
    ``pr_hist``: a variant that marks more than the baseline is compared at the baseline's precision.

    Returns:
        ``recall``, ``precision`` and ``threshold`` (predict nodule where probability > threshold,
        a bin edge) of that operating point; NaN values when no threshold reaches ``precision``.
    """
    pos = np.asarray(pr_hist["pos"], dtype=np.float64)
    neg = np.asarray(pr_hist["neg"], dtype=np.float64)
    tps, fps = np.cumsum(pos[::-1])[::-1], np.cumsum(neg[::-1])[::-1]  # predicted at threshold k / bins
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = tps / (tps + fps)
    ok = np.flatnonzero(prec >= precision)
    if not ok.size or not pos.sum():
        return {"recall": float("nan"), "precision": float("nan"), "threshold": float("nan")}
    k = int(ok[0])  # the lowest threshold that reaches the precision gives the highest recall
    return {"recall": float(tps[k] / pos.sum()), "precision": float(prec[k]), "threshold": k / len(pos)}
