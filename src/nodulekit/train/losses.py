"""Segmentation loss: soft Dice plus a weighted Dice on the nodule pixels alone.

The second term only looks at pixels inside the label, so it cannot be lowered by predicting
background: it punishes missed nodule pixels (false negatives) ``fn_weight`` times harder than the
plain Dice does. Recall matters more than precision for a candidate generator, since the
classifier removes false positives later (dlwpt-code's ``diceLoss(p, l) + 8 * diceLoss(p * l, l)``).

The weight decides what the loss prefers, not only how hard it pushes. A model that marks every
dense structure in a crop (vessels, airway walls, the heart's border) misses no nodule pixel: the
second term is 0, and the plain Dice is about 0.9, the nodule being a small share of what is
marked. One that marks nodules alone brings the plain Dice to about 0.5 but misses a rim of some
nodules, say 15 % of their pixels, which the second term charges ``fn_weight`` times: at dlwpt's 8
that is 0.5 + 1.2, worse than marking everything; at 2 it is 0.8, better. From a fresh model,
training at 8 can therefore settle on over-marking and leave it late or not at all within a short
schedule, depending on the draw of the training data, and hand the classifier thousands of
candidates per scan. The default, 2, prefers marking the nodules alone and leaves that plateau
early; it still charges a missed pixel twice what a false one costs.

Per-sample Dice (dlwpt) saturates on crops without a nodule: ``1 - 1 / (sum(p) + 1)`` is already
close to 1 after a few false-positive pixels and its gradient ``1 / (sum(p) + 1)^2`` vanishes, so
background crops teach the model almost nothing and whole slices end up covered in false
positives. ``batch=True`` pools the sums over the batch (nnU-Net's "batch Dice"): every false
positive pixel then enlarges the denominator of a Dice that has true positives in it, and keeps
a gradient.

Pooling has a catch of its own: a crop inside a 25 mm nodule holds a hundred times the nodule
pixels of a crop around a 4 mm one, and once such crops sit in the batch every false-positive pixel
elsewhere barely moves the pooled Dice; the model learns to mark whole regions. ``area_cap`` weighs
each crop's sums by ``area_cap / max(nodule pixels, area_cap)``: crops with small nodules and
background crops count in full, a crop with a big nodule counts as if its nodule had ``area_cap``
pixels.
"""

from __future__ import annotations

import torch


def soft_dice_loss(pred: torch.Tensor, label: torch.Tensor, epsilon: float = 1.0, *,
                   batch: bool = False, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - soft Dice`` per sample (over all non-batch dimensions), or over the whole batch.

    Args:
        pred: probabilities ``(N, ...)``.
        label: 0/1 targets of the same shape.
        epsilon: smoothing, so that an empty label with an empty prediction scores 0.
        batch: one Dice over the whole batch instead of one per sample.
        weights: ``(N,)`` weights of each sample's sums in the pooled Dice (``batch=True`` only).

    Returns:
        ``(N,)`` losses in [0, 1], or a ``(1,)`` loss with ``batch=True``.
    """
    n = pred.shape[0]
    pred = pred.reshape(n, -1)
    label = label.reshape(n, -1).to(pred.dtype)
    inter, p_sum, y_sum = (pred * label).sum(1), pred.sum(1), label.sum(1)
    if batch:
        w = torch.ones_like(inter) if weights is None else weights.to(inter.dtype).reshape(n)
        inter, p_sum, y_sum = (w * inter).sum(0, keepdim=True), (w * p_sum).sum(0, keepdim=True), \
            (w * y_sum).sum(0, keepdim=True)
    elif weights is not None:
        raise ValueError("weights apply to the pooled (batch=True) Dice only")
    return 1.0 - (2 * inter + epsilon) / (p_sum + y_sum + epsilon)


def dice_loss(pred: torch.Tensor, label: torch.Tensor, fn_weight: float = 2.0, *,
              batch_dice: bool = False, area_cap: float | None = None) -> torch.Tensor:
    """Soft Dice + ``fn_weight`` x soft Dice on the positive pixels only, averaged over the batch.

    Args:
        pred: ``(N, 1, H, W)`` probabilities.
        label: ``(N, 1, H, W)`` 0/1 (bool or float) nodule mask.
        fn_weight: weight of the false-negative term.
        batch_dice: pool both Dice terms over the batch (see the module docstring).
        area_cap: with ``batch_dice``, nodule pixels beyond which a crop's weight in the pooled
            sums shrinks (see the module docstring); None weighs every pixel alike.
    """
    label = label.to(pred.dtype)
    weights = None
    if batch_dice and area_cap:
        weights = area_cap / label.reshape(label.shape[0], -1).sum(1).clamp(min=area_cap)
    loss = (soft_dice_loss(pred, label, batch=batch_dice, weights=weights)
            + fn_weight * soft_dice_loss(pred * label, label, batch=batch_dice, weights=weights))
    return loss.mean()
