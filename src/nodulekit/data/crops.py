"""Classifier crops around a candidate: native voxels (dlwpt) or resampled to a fixed voxel size.

A native crop of ``(32, 48, 48)`` voxels covers 20 to 80 mm along the slice axis, depending on
the scan's slice spacing (0.625 to 2.5 mm in LUNA16): the same nodule looks four times taller
on one scan than on another. Resampling the crop to a fixed voxel size (``crop_spacing``, mm
per voxel along index, row, col) makes a nodule of a given size look the same on every scan,
which a classifier trained on a few dozen nodules needs to generalize. ``crop_spacing=None``
keeps dlwpt's native crops, which its checkpoints were trained on.

Both kinds put the candidate at voxel ``shape // 2`` of the crop and fill the outside of the
volume with air (-1000 HU); the result is clipped to [-1000, 1000] HU as float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from nodulekit import HU_MAX, HU_MIN

PAD_HU = HU_MIN

# (index, row, col) mm per voxel of resampled crops: (32, 48, 48) voxels cover 40 x 38 x 38 mm,
# room for the largest LUNA16 nodules (30 mm) with context
DEFAULT_CROP_SPACING = (1.25, 0.8, 0.8)


def crop_hu(hu: np.ndarray, center_irc, shape, pad: float = PAD_HU) -> np.ndarray:
    """Cut a box of ``shape`` (index, row, col) centred on ``center_irc`` out of ``hu`` (native voxels).

    The centre is rounded to the nearest voxel; the box starts at ``centre - shape // 2``. Parts
    outside the volume are filled with ``pad`` (air). Always returns a new array of ``hu``'s dtype.
    """
    center = np.rint(np.asarray(center_irc, dtype=np.float64)).astype(int)
    shape = tuple(int(s) for s in shape)
    out = np.full(shape, pad, dtype=hu.dtype)
    src, dst = [], []
    for c, s, n in zip(center, shape, hu.shape):
        start = c - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        if lo >= hi:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = hu[tuple(src)]
    return out


def resampled_crop(hu: np.ndarray, spacing_irc: Sequence[float], center_irc, shape,
                   crop_spacing: Sequence[float]) -> np.ndarray:
    """A ``shape`` crop with voxels of ``crop_spacing`` mm (index, row, col), trilinear.

    Args:
        hu: volume (index, row, col).
        spacing_irc: its voxel size in mm, in (index, row, col) order (``CTVolume.spacing[::-1]``).
        center_irc: continuous voxel position of the candidate; it lands on crop voxel ``shape // 2``.
        shape: crop size in voxels.
        crop_spacing: crop voxel size in mm.
    """
    shape = np.asarray(shape, dtype=int)
    step = np.asarray(crop_spacing, dtype=np.float64) / np.asarray(spacing_irc, dtype=np.float64)
    center = np.asarray(center_irc, dtype=np.float64)
    # native coordinates of the crop's first and last voxel, and a native box around them
    first = center - (shape // 2) * step
    last = first + (shape - 1) * step
    lo = np.floor(first).astype(int) - 1
    box_shape = np.ceil(last).astype(int) + 2 - lo
    box = crop_hu(hu, lo + box_shape // 2, box_shape).astype(np.float32, copy=False)
    axes = [first[k] - lo[k] + step[k] * np.arange(shape[k]) for k in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    out = ndimage.map_coordinates(box, coords, order=1, mode="nearest").reshape(tuple(shape))
    return np.clip(out, HU_MIN, HU_MAX).astype(np.float32, copy=False)


def cls_crop(hu: np.ndarray, spacing_xyz: Sequence[float], center_irc, shape,
             crop_spacing: Sequence[float] | None = None) -> np.ndarray:
    """The classifier's input around a candidate: float32 HU in [-1000, 1000] of ``shape``.

    Args:
        hu: volume (index, row, col); ``spacing_xyz``: its voxel size (x, y, z) as ``CTVolume.spacing``.
        center_irc: candidate position in voxels.
        shape: crop size in voxels (index, row, col).
        crop_spacing: mm per crop voxel (index, row, col); ``None``: native voxels, as dlwpt.
    """
    if crop_spacing is None:
        out = crop_hu(hu, center_irc, shape).astype(np.float32, copy=False)
        return np.clip(out, HU_MIN, HU_MAX, out=out)
    return resampled_crop(hu, tuple(spacing_xyz)[::-1], center_irc, shape, crop_spacing)


def parse_crop_spacing(text: str | None) -> tuple[float, float, float] | None:
    """``"1.25,0.8,0.8"`` -> ``(1.25, 0.8, 0.8)``; ``"native"``, ``"none"`` or empty -> ``None``."""
    if text is None or str(text).strip().lower() in ("", "native", "none"):
        return None
    try:
        vals = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        vals = ()
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(v > 0 for v in vals):
        raise ValueError(f"crop spacing must be 'native' or three positive mm values 'index,row,col', got {text!r}")
    return vals
