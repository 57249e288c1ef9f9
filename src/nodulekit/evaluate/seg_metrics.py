"""Segmentation metrics on whole validation slices, for any predictor.

``predict`` maps ``np.float32 (N, 7, H, W)`` to ``(N, 1, H, W)`` probabilities, so a PyTorch model,
an ONNX file and an RKNN model are measured by the same code (see ``nodulekit.deploy.runtime``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SIZE_BIN_MM = 5.0  # nodules under 5 mm are hard and clinically less urgent: reported apart


def evaluate_seg(predict: Callable[[np.ndarray], np.ndarray], val_ds, threshold: float = 0.5,
                 batch_size: int = 4, progress: bool = False) -> dict:
    """Pixel and nodule-level metrics of a segmentation predictor on a validation dataset.

    Args:
        predict: ``np.float32 (N, 7, H, W) -> (N, 1, H, W)`` probabilities.
        val_ds: a :class:`nodulekit.data.seg_dataset.SegValDataset` (items ``(image, labels,
            scan index)``, attribute ``nodules``).
        threshold: a pixel is predicted nodule when its probability is above this.
        batch_size: slices per ``predict`` call (consecutive slices of one scan).
        progress: show a progress bar.

    Returns:
        ``recall``, ``precision``, ``dice`` (pixel F1) at ``threshold``; ``nodule_recall`` (a nodule
        is found when any of its label pixels is predicted), ``nodule_recall_lt5`` and
        ``nodule_recall_ge5`` by diameter, the counts behind them, and ``slices``. A ratio with an
        empty denominator is NaN.
    """
    from tqdm import tqdm

    tp = fp = fn = 0
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
        found.update((int(scan), int(k)) for k in np.unique(lab[pred & truth]))
        bar.update(end - start)
        start = end
    bar.close()

    def ratio(a, b):
        return a / b if b else float("nan")

    nodules = list(val_ds.nodules)
    small = [(s, k) for s, k, d in nodules if d < SIZE_BIN_MM]
    large = [(s, k) for s, k, d in nodules if not d < SIZE_BIN_MM]
    hits = lambda group: sum((s, k) in found for s, k in group)  # noqa: E731
    return {
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
