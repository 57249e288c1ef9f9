"""Classifier crops around a candidate: native voxels (dlwpt) or resampled to a fixed voxel size.

A native crop of ``(32, 48, 48)`` voxels covers 20 to 80 mm along the slice axis, depending on
the scan's slice spacing (0.625 to 2.5 mm in LUNA16): the same nodule looks four times taller
on one scan than on another. Resampling the crop to a fixed voxel size (``crop_spacing``, mm
per voxel along index, row, col) makes a nodule of a given size look the same on every scan,
which a classifier trained on a few dozen nodules needs to generalize. ``crop_spacing=None``
keeps dlwpt's native crops, which its checkpoints were trained on.

Both kinds put the candidate at voxel ``shape // 2`` of the crop and fill the outside of the
volume with air (-1000 HU); the result is clipped to [-1000, 1000] HU as float32.

A classifier with ``context`` gets a second channel: the same candidate cut with ``context`` times
the voxel size, the same number of voxels over ``context`` times the field of view
(:func:`cls_input`). A vessel seen end-on and a nodule look alike in a 40 mm box; what tells them
apart is what continues beyond it, a branch running on towards the hilum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def _interp_axis(a: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` at fractional indices ``pos`` along ``axis`` (indices clamped)."""
    n = a.shape[axis]
    i0 = np.floor(pos).astype(np.intp)
    frac = (pos - i0).astype(np.float32)
    lo = np.take(a, np.clip(i0, 0, n - 1), axis=axis)
    hi = np.take(a, np.clip(i0 + 1, 0, n - 1), axis=axis)
    shape = [1] * a.ndim
    shape[axis] = len(pos)
    return lo + (hi - lo) * frac.reshape(shape)


def resampled_crop(hu: np.ndarray, spacing_irc: Sequence[float], center_irc, shape,
                   crop_spacing: Sequence[float]) -> np.ndarray:
    """A ``shape`` crop with voxels of ``crop_spacing`` mm (index, row, col), trilinear.

    The crop samples an axis-aligned regular grid, so trilinear interpolation splits into three 1D
    linear interpolations, one axis after the other, on a shrinking array: a tenth of the work of
    ``scipy.ndimage.map_coordinates(order=1, mode="nearest")``, which computes eight weights for
    every output voxel, with the same values to float32 rounding (tests/test_crops.py checks it).
    Training cuts tens of thousands of these and detection one per candidate.

    Along the slice axis only the two native slices around each sample are read, in-plane only the
    box the samples span: a context channel's coarse grid (:func:`cls_input`) would otherwise copy
    a box 15 times its own size.

    Args:
        hu: volume (index, row, col).
        spacing_irc: its voxel size in mm, in (index, row, col) order (``CTVolume.spacing[::-1]``).
        center_irc: continuous voxel position of the candidate; it lands on crop voxel ``shape // 2``.
        shape: crop size in voxels.
        crop_spacing: crop voxel size in mm.
    """
    # native coordinates of each axis's samples
    positions = []
    for c, n, native, wanted in zip(center_irc, shape, spacing_irc, crop_spacing):
        step = float(wanted) / float(native)
        positions.append(float(c) - (int(n) // 2) * step + step * np.arange(int(n)))
    i0 = np.floor(positions[0]).astype(np.intp)
    lo = [int(np.floor(p[0])) for p in positions[1:]]
    box = _planes(hu, np.stack([i0, i0 + 1], axis=1).reshape(-1), lo,
                  [int(np.floor(p[-1])) + 2 for p in positions[1:]])
    frac = (positions[0] - i0).astype(np.float32).reshape(-1, 1, 1)
    out = box[0::2] + (box[1::2] - box[0::2]) * frac
    for axis in (1, 2):
        out = _interp_axis(out, positions[axis] - lo[axis - 1], axis)
    return np.clip(out, HU_MIN, HU_MAX, out=out)


def _planes(hu: np.ndarray, planes: np.ndarray, lo, hi) -> np.ndarray:
    """float32 ``hu[planes, lo[0]:hi[0], lo[1]:hi[1]]``, air (``PAD_HU``) outside the volume."""
    out = np.full((len(planes), hi[0] - lo[0], hi[1] - lo[1]), PAD_HU, dtype=np.float32)
    inside = (planes >= 0) & (planes < hu.shape[0])
    (r0, r1), (c0, c1) = ((max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, hu.shape[1:]))
    if inside.any() and r0 < r1 and c0 < c1:
        out[inside, r0 - lo[0]:r1 - lo[0], c0 - lo[1]:c1 - lo[1]] = hu[planes[inside], r0:r1, c0:c1]
    return out


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


def channel_spacings(crop_spacing: Sequence[float] | None,
                     context: float | None = None) -> list[tuple[float, float, float] | None]:
    """The voxel size of each input channel of a classifier: ``crop_spacing``, then ``context``
    times it when the classifier sees context (which needs resampled crops)."""
    spacing = None if crop_spacing is None else tuple(float(v) for v in crop_spacing)
    if context is None:
        return [spacing]
    check_context(context)
    if spacing is None:
        raise ValueError("a context channel needs resampled crops (a crop spacing), not native voxels")
    return [spacing, tuple(float(context) * v for v in spacing)]


def check_context(context: float | None) -> float | None:
    """``context`` (the context channel's field of view over the crop's) if valid: None or a
    finite number in (1, 8]."""
    if context is not None and not (isinstance(context, (int, float)) and 1.0 < float(context) <= 8.0):
        raise ValueError(f"context must be a field-of-view factor in (1, 8], got {context!r}")
    return None if context is None else float(context)


def cls_input(hu: np.ndarray, spacing_xyz: Sequence[float], center_irc, shape,
              crop_spacing: Sequence[float] | None = None, context: float | None = None) -> np.ndarray:
    """The classifier's ``(C, *shape)`` input around a candidate: :func:`cls_crop` at each of
    :func:`channel_spacings` (one channel without ``context``, two with it)."""
    return np.stack([cls_crop(hu, spacing_xyz, center_irc, shape, s)
                     for s in channel_spacings(crop_spacing, context)])


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
