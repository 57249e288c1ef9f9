"""CPU data augmentation on whole batches: flips, shifts, scale, rotation, noise.

One random affine per sample, applied to the batch with a single ``affine_grid`` + ``grid_sample``
call, so the cost is one interpolation pass however many transforms are switched on. Image and
label go through the same grid (the label is interpolated and re-thresholded at 0.5), which keeps
them aligned. Randomness sits in :meth:`RandAffine.randomize` and draws from a ``torch.Generator``,
so a seeded generator reproduces a run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from nodulekit import HU_MAX, HU_MIN


@lru_cache(maxsize=8)
def _base_grid(spatial: tuple[int, ...]) -> torch.Tensor:
    # homogeneous sampling coordinates of the identity, (P, ndim + 1); affine_grid's own
    # construction costs more than the warp itself on small batches
    ndim = len(spatial)
    eye = torch.eye(ndim, ndim + 1)[None]
    base = F.affine_grid(eye, [1, 1, *spatial], align_corners=False).reshape(-1, ndim)
    return torch.cat([base, torch.ones(base.shape[0], 1)], dim=1)


def affine_grid(theta: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Same as ``F.affine_grid(theta, (N, C, *spatial), align_corners=False)``, faster on the CPU."""
    grid = _base_grid(tuple(int(s) for s in spatial)) @ theta.transpose(1, 2)
    return grid.reshape(theta.shape[0], *spatial, len(spatial))


@dataclass
class RandAffine:
    """Random flip / shift / scale / rotation / Gaussian noise for ``(N, C, *spatial)`` batches.

    Works on 2D slices ``(N, C, H, W)`` and 3D crops ``(N, C, D, H, W)``. In 3D the rotation turns
    the (row, col) plane only: CT slices are thicker than their pixels, so tilting across them would
    smear the index axis.

    Attributes:
        flip: mirror each in-plane axis (row, col) with probability 0.5.
        flip_slices: 3D only: mirror the index (slice) axis with probability 0.5 too. A nodule or a
            vessel looks the same from head or feet; off by default so that a seeded run draws the
            same transforms as before the option.
        shift: largest translation, as a fraction of the side (0.1 = 10 %).
        scale: largest relative zoom in or out (0.2 = 0.8x to 1.2x), the same on every axis.
        rotate_deg: largest in-plane rotation in degrees (180 = any angle).
        noise_hu: standard deviation of additive Gaussian noise, in HU.
    """

    flip: bool = True
    shift: float = 0.1
    scale: float = 0.2
    rotate_deg: float = 180.0
    noise_hu: float = 25.0
    flip_slices: bool = False

    def __post_init__(self):
        for name in ("shift", "scale", "rotate_deg", "noise_hu"):
            if getattr(self, name) < 0:
                raise ValueError(f"RandAffine.{name} must be >= 0, got {getattr(self, name)}")

    def randomize(self, n: int, ndim: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` affine matrices ``(n, ndim, ndim + 1)`` in ``affine_grid``'s normalised
        coordinates (axis order x=col, y=row[, z=index])."""

        def uniform(*shape):
            return torch.rand(*shape, generator=generator) * 2 - 1

        theta = torch.zeros(n, ndim, ndim + 1)
        theta[:, range(ndim), range(ndim)] = 1.0
        if self.flip:
            signs = torch.where(torch.rand(n, 2, generator=generator) < 0.5, -1.0, 1.0)
            theta[:, 0, 0] = signs[:, 0]
            theta[:, 1, 1] = signs[:, 1]
        if self.flip_slices and ndim == 3:
            theta[:, 2, 2] = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        angle = uniform(n) * math.radians(self.rotate_deg)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.eye(ndim).repeat(n, 1, 1)
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, -sin, sin, cos
        zoom = 1.0 + uniform(n) * self.scale
        lin = rot @ theta[:, :, :ndim] * zoom[:, None, None]
        shift = uniform(n, ndim) * self.shift * 2  # normalised coordinates span [-1, 1]
        return torch.cat([lin, shift[:, :, None]], dim=2)

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, channel_fov: Sequence[float] | None = None):
        """Augment a batch.

        Args:
            image: ``(N, C, *spatial)`` float HU.
            label: optional ``(N, 1, *spatial)`` 0/1 mask, transformed with the image (as its first
                channel).
            generator: source of randomness (seed it for reproducible runs).
            channel_fov: each channel's field of view relative to the first (a classifier's context
                channel, :func:`nodulekit.data.crops.cls_input`): its shift is divided by it, so that
                every channel moves by the same millimetres and stays centred on the same point.

        Returns:
            ``image`` or ``(image, label)``; the label as float 0/1.
        """
        n, c = image.shape[:2]
        ndim = image.dim() - 2
        if ndim not in (2, 3):
            raise ValueError(f"RandAffine wants (N, C, H, W) or (N, C, D, H, W), got {tuple(image.shape)}")
        if channel_fov is not None and len(channel_fov) != c:
            raise ValueError(f"channel_fov has {len(channel_fov)} values for {c} channels")
        theta = self.randomize(n, ndim, generator)
        stacked = image.float() if label is None else torch.cat([image.float(), label.float()], dim=1)
        if channel_fov is None or all(float(f) == 1.0 for f in channel_fov):
            grid = affine_grid(theta, tuple(stacked.shape[2:]))
            out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="border", align_corners=False)
        else:
            parts = []
            for k, fov in enumerate([*channel_fov, *([1.0] if label is not None else [])]):
                t = theta.clone()
                t[:, :, ndim] /= float(fov)
                grid = affine_grid(t, tuple(stacked.shape[2:]))
                parts.append(F.grid_sample(stacked[:, k:k + 1], grid, mode="bilinear", padding_mode="border",
                                           align_corners=False))
            out = torch.cat(parts, dim=1)
        img = out[:, :c]
        if self.noise_hu > 0:
            img = img + torch.randn(img.shape, generator=generator) * self.noise_hu
        img = img.clamp_(HU_MIN, HU_MAX)
        if label is None:
            return img
        return img, (out[:, c:] > 0.5).float()
