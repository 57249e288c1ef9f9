"""A cheap lung mask from thresholds and connected components.

It only decides which slices to segment and where candidates may lie, so it errs on the generous
side: it is dilated by a few millimetres so that nodules touching the pleura stay inside.

Its cost is a few passes over a 1 mm grid (connected components in 3D and per slice, a distance
transform per slice for the in-plane dilation), bound by memory traffic over the volume rather
than by Python loops.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Aerated lung is about -850 HU, soft tissue about 0: -400 separates them with a wide margin
# and keeps ground-glass lung (around -600) on the lung side.
AIR_THRESHOLD_HU = -400.0
# Lungs of an adult hold several litres; anything under this is bowel gas, a trachea segment or noise.
MIN_LUNG_ML = 50.0
DILATE_MM = 5.0
# The mask is computed on a grid of about this in-plane spacing (every 2nd pixel of a typical
# 0.6-0.8 mm scan: 4x fewer voxels): a mask dilated by DILATE_MM needs no finer outline, and its
# passes over the volume are most of the mask's cost.
WORK_SPACING_MM = 1.5


def _spacing_zyx(spacing_xyz) -> np.ndarray:
    return np.asarray(spacing_xyz, dtype=np.float64)[::-1]


def fill_holes_per_slice(mask: np.ndarray, max_area_px: float | None = None) -> np.ndarray:
    """Fill the holes of every slice of ``mask`` (in place) and return it: ``binary_fill_holes`` per
    slice, in one labelling of the whole stack (background pixels 4-connected within a slice; a hole
    is a background component that does not reach the slice's border), optionally only holes of at
    most ``max_area_px`` pixels."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    background, n = ndimage.label(~mask, structure=in_plane)
    if n == 0:
        return mask
    fill = np.ones(n + 1, dtype=bool)
    if max_area_px is not None:
        fill = np.bincount(background.ravel(), minlength=n + 1) <= max_area_px
    for edge in (background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]):
        fill[edge.ravel()] = False
    fill[0] = False
    mask |= fill[background]
    return mask


def _dilate(mask: np.ndarray, radius_mm: float, spacing_zyx: np.ndarray) -> np.ndarray:
    """Dilate by a cylinder: a disk of ``radius_mm`` in plane, and as many slices along z.

    A cylinder is a little more generous than a ball. It is applied as two passes whose cost does
    not grow with the radius: a running maximum along z, then,
    per slice, the pixels within ``radius_mm`` of the mask by a Euclidean distance transform (the
    same set as a binary dilation with the disk ``(dy * sy)^2 + (dx * sx)^2 <= radius^2``, several
    times faster).
    """
    r_z = int(np.floor(radius_mm / spacing_zyx[0]))
    if r_z > 0:  # a running maximum over 2 r_z + 1 slices, one byte per voxel
        out = ndimage.maximum_filter1d(mask.view(np.uint8), size=2 * r_z + 1, axis=0, mode="constant").view(bool)
    else:
        out = mask.copy()
    for z in range(out.shape[0]):
        if out[z].any():
            out[z] = ndimage.distance_transform_edt(~out[z], sampling=spacing_zyx[1:]) <= radius_mm
    return out


def _body_mask(hu: np.ndarray) -> np.ndarray:
    """Per slice: the body is everything enclosed by soft tissue (holes filled in 2D).

    Filling slice by slice keeps the lungs inside the body even where the 3D outline is open
    (the trachea reaches the top of the scan, the couch gap, a cropped field of view).
    """
    tissue = hu > AIR_THRESHOLD_HU
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 2)  # ndimage.label's 2D default, per slice
    labels, n = ndimage.label(tissue, structure=in_plane)
    if n == 0:
        return np.zeros_like(tissue)
    # labels run in raster order, so each slice holds one contiguous range of them: the largest
    # tissue blob of each slice (the patient; the couch and cables are smaller) is found per range
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    last = np.maximum.accumulate(labels.reshape(len(labels), -1).max(axis=1))
    keep = np.zeros(n + 1, dtype=bool)
    first = 1
    for stop in last:
        if stop >= first:
            keep[first + int(np.argmax(sizes[first: stop + 1]))] = True
            first = stop + 1
    return fill_holes_per_slice(keep[labels])


def lung_mask(
    hu: np.ndarray,
    spacing_xyz,
    *,
    threshold_hu: float = AIR_THRESHOLD_HU,
    min_lung_ml: float = MIN_LUNG_ML,
    dilate_mm: float = DILATE_MM,
) -> np.ndarray:
    """Boolean lung mask of a CT volume.

    Steps: air (HU below ``threshold_hu``) inside the body outline; 3D connected components; drop
    the ones touching the in-plane border (outside air) and those smaller than ``min_lung_ml``;
    fill holes per slice (vessels, nodules); dilate by ``dilate_mm``.

    Args:
        hu: volume in HU, (index, row, col).
        spacing_xyz: voxel size (x, y, z) in mm.
        threshold_hu: air/tissue threshold.
        min_lung_ml: smallest air component kept, in millilitres.
        dilate_mm: final dilation radius, so juxtapleural nodules stay inside.

    Returns:
        ``bool`` array of the shape of ``hu``; all False when no lung is found.
    """
    _, dilated, step, shape = _work_masks(hu, spacing_xyz, threshold_hu, min_lung_ml, dilate_mm)
    return _upsample(dilated, step, shape)


def lung_masks(
    hu: np.ndarray,
    spacing_xyz,
    *,
    threshold_hu: float = AIR_THRESHOLD_HU,
    min_lung_ml: float = MIN_LUNG_ML,
    dilate_mm: float = DILATE_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """``(lung, dilated)``: the lung mask of :func:`lung_mask` before and after its dilation, from
    one pass (the first is where aerated lung is, holes filled; the second where candidates may
    lie)."""
    lung, dilated, step, shape = _work_masks(hu, spacing_xyz, threshold_hu, min_lung_ml, dilate_mm)
    up = _upsample(lung, step, shape)
    return up, (up if dilated is lung else _upsample(dilated, step, shape))


def _work_masks(hu, spacing_xyz, threshold_hu: float, min_lung_ml: float, dilate_mm: float):
    """``(lung, dilated, step, shape)``: both masks on the work grid (every ``step``-th pixel in
    plane; all False when no lung is found), and the scan's shape to bring them back to."""
    hu = np.asarray(hu)
    full_shape = hu.shape
    spacing = _spacing_zyx(spacing_xyz)
    step = max(1, int(round(WORK_SPACING_MM / max(min(spacing[1], spacing[2]), 1e-3))))
    if step > 1:
        hu = hu[:, ::step, ::step]
        spacing = spacing * np.array([1, step, step])
    voxel_ml = float(np.prod(spacing)) / 1000.0

    body = _body_mask(hu)
    air = (hu < threshold_hu) & body
    labels, n = ndimage.label(air)
    none = np.zeros(hu.shape, dtype=bool)
    if n == 0:
        return none, none, step, full_shape

    border = np.zeros(hu.shape, dtype=bool)
    border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
    touching = np.unique(labels[border])
    keep = np.bincount(labels.ravel(), minlength=n + 1) * voxel_ml >= min_lung_ml
    keep[0] = False
    keep[touching] = False
    if not keep.any():
        return none, none, step, full_shape
    mask = fill_holes_per_slice(keep[labels])
    return mask, (_dilate(mask, dilate_mm, spacing) if dilate_mm > 0 else mask), step, full_shape


def _upsample(mask: np.ndarray, step: int, full_shape: tuple[int, ...]) -> np.ndarray:
    """A mask of the work grid (every ``step``-th pixel in plane) back on the scan's grid."""
    if step == 1:
        return mask
    z, h, w = mask.shape
    up = np.broadcast_to(mask[:, :, None, :, None], (z, h, step, w, step)).reshape(z, h * step, w * step)
    out = np.zeros(full_shape, dtype=bool)
    rows, cols = min(full_shape[1], h * step), min(full_shape[2], w * step)
    out[:, :rows, :cols] = up[:, :rows, :cols]
    return out


def lung_volume_ml(mask: np.ndarray, spacing_xyz) -> float:
    """Volume of a mask in millilitres."""
    return float(mask.sum()) * float(np.prod(spacing_xyz)) / 1000.0


def lung_components(mask: np.ndarray, min_ml: float, spacing_xyz) -> int:
    """Number of 3D components of ``mask`` of at least ``min_ml`` millilitres."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing_xyz)) / 1000.0
    return int((sizes >= min_ml).sum())
