"""Segmentation loss: soft Dice plus a weighted Dice on the nodule pixels alone.

The second term only looks at pixels inside the label, so it cannot be lowered by predicting
background: it punishes missed nodule pixels (false negatives) ``fn_weight`` times harder than the
plain Dice does. Recall matters more than precision for a candidate generator, since the
classifier removes false positives later (dlwpt-code's ``diceLoss(p, l) + 8 * diceLoss(p * l, l)``).

Per-sample Dice (dlwpt) saturates on crops without a nodule: ``1 - 1 / (sum(p) + 1)`` is already
close to 1 after a few false-positive pixels and its gradient ``1 / (sum(p) + 1)^2`` vanishes, so
background crops teach the model almost nothing and whole slices end up covered in false
positives. ``batch=True`` pools the sums over the batch (nnU-Net's "batch Dice"): every false
positive pixel then enlarges the denominator of a Dice that has true positives in it, and keeps
a gradient.
"""

from __future__ import annotations

import torch


def soft_dice_loss(pred: torch.Tensor, label: torch.Tensor, epsilon: float = 1.0, *,
                   batch: bool = False) -> torch.Tensor:
    """``1 - soft Dice`` per sample (over all non-batch dimensions), or over the whole batch.

    Args:
        pred: probabilities ``(N, ...)``.
        label: 0/1 targets of the same shape.
        epsilon: smoothing, so that an empty label with an empty prediction scores 0.
        batch: one Dice over the whole batch instead of one per sample.

    Returns:
        ``(N,)`` losses in [0, 1], or a ``(1,)`` loss with ``batch=True``.
    """
    rows = 1 if batch else pred.shape[0]
    pred = pred.reshape(rows, -1)
    label = label.reshape(rows, -1).to(pred.dtype)
    inter = (pred * label).sum(1)
    return 1.0 - (2 * inter + epsilon) / (pred.sum(1) + label.sum(1) + epsilon)


def dice_loss(pred: torch.Tensor, label: torch.Tensor, fn_weight: float = 8.0, *,
              batch_dice: bool = False) -> torch.Tensor:
    """Soft Dice + ``fn_weight`` x soft Dice on the positive pixels only, averaged over the batch.

    Args:
        pred: ``(N, 1, H, W)`` probabilities.
        label: ``(N, 1, H, W)`` 0/1 (bool or float) nodule mask.
        fn_weight: weight of the false-negative term.
        batch_dice: pool both Dice terms over the batch (see the module docstring).
    """
    label = label.to(pred.dtype)
    loss = (soft_dice_loss(pred, label, batch=batch_dice)
            + fn_weight * soft_dice_loss(pred * label, label, batch=batch_dice))
    return loss.mean()
