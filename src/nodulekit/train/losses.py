"""Segmentation loss: soft Dice plus a weighted Dice on the nodule pixels alone.

The second term only looks at pixels inside the label, so it cannot be lowered by predicting
background: it punishes missed nodule pixels (false negatives) ``fn_weight`` times harder than the
plain Dice does. Recall matters more than precision for a candidate generator, since the
classifier removes false positives later (dlwpt-code's ``diceLoss(p, l) + 8 * diceLoss(p * l, l)``).
"""

from __future__ import annotations

import torch


def soft_dice_loss(pred: torch.Tensor, label: torch.Tensor, epsilon: float = 1.0) -> torch.Tensor:
    """Per-sample ``1 - soft Dice`` over all non-batch dimensions.

    Args:
        pred: probabilities ``(N, ...)``.
        label: 0/1 targets of the same shape.
        epsilon: smoothing, so that an empty label with an empty prediction scores 0.

    Returns:
        ``(N,)`` losses in [0, 1].
    """
    pred = pred.flatten(1)
    label = label.flatten(1).to(pred.dtype)
    inter = (pred * label).sum(1)
    return 1.0 - (2 * inter + epsilon) / (pred.sum(1) + label.sum(1) + epsilon)


def dice_loss(pred: torch.Tensor, label: torch.Tensor, fn_weight: float = 8.0) -> torch.Tensor:
    """Soft Dice + ``fn_weight`` x soft Dice on the positive pixels only, averaged over the batch.

    Args:
        pred: ``(N, 1, H, W)`` probabilities.
        label: ``(N, 1, H, W)`` 0/1 (bool or float) nodule mask.
        fn_weight: weight of the false-negative term.
    """
    label = label.to(pred.dtype)
    loss = soft_dice_loss(pred, label) + fn_weight * soft_dice_loss(pred * label, label)
    return loss.mean()
