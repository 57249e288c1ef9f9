"""Nodule label volumes for segmentation training.

A dataset may carry exact labels (``masks/<uid>.mhd``, written by the synthetic generator:
0 = background, k = the k-th annotation row of that series). LUNA16 has only centres and
diameters, so labels are grown from them with dlwpt-code's rule: from the annotation centre, widen
a box along each axis while the voxels on both sides stay denser than -700 HU, then keep the voxels
of the box above -700 HU.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nodulekit.data.luna import Annotation
from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError

THRESHOLD_HU = -700
MIN_RADIUS = 2


def _radius(hu: np.ndarray, center: tuple[int, int, int], axis: int) -> int:
    """Grow a radius along one axis while both neighbours at that distance exceed the threshold."""
    n = hu.shape[axis]
    c = center[axis]
    r = MIN_RADIUS

    def dense(offset: int) -> bool:
        pos = list(center)
        pos[axis] = c + offset
        return hu[tuple(pos)] > THRESHOLD_HU

    # dlwpt-code stops at the volume edge (its IndexError); negative indices must not wrap around
    while c - r - 1 >= 0 and c + r + 1 < n and dense(r) and dense(-r):
        r += 1
    return r


def grown_mask(ct: CTVolume, annotation: Annotation) -> np.ndarray:
    """The boolean mask grown from one annotation centre (dlwpt-code's rule), same shape as ``ct.hu``.

    Returns an all-False mask when the centre lies outside the volume.
    """
    hu = ct.hu
    center = tuple(int(v) for v in np.rint(ct.world_to_voxel(annotation.center_xyz)))
    mask = np.zeros(hu.shape, dtype=bool)
    if any(c < 0 or c >= n for c, n in zip(center, hu.shape)):
        return mask
    radii = [_radius(hu, center, axis) for axis in range(3)]
    box = tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip(center, radii))
    mask[box] = np.asarray(hu[box]) > THRESHOLD_HU
    return mask


def read_label_volume(path: str | Path, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Read a label volume (``masks/<uid>.mhd``) as uint16, checking its shape against ``shape``."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise InputError(path, f"SimpleITK cannot read it ({str(exc).strip().splitlines()[-1]})") from None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise InputError(path, f"label shape {tuple(arr.shape)} differs from the scan's {tuple(shape)}")
    if not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
        raise InputError(path, f"labels must be non-negative integers, got {arr.dtype}")
    return arr.astype(np.uint16, copy=False)


def nodule_labels(data_dir: str | Path | None, ct: CTVolume, annotations: Iterable[Annotation]) -> np.ndarray:
    """Label volume of the nodules in ``ct``: 0 background, k for the k-th annotation of its series.

    Args:
        data_dir: dataset folder; ``data_dir/masks/<uid>.mhd`` is used when it exists. ``None``
            always grows labels.
        ct: the scan.
        annotations: annotations of any series; only those of ``ct.seriesuid`` count, in order.

    Returns:
        uint16 array of ``ct.hu``'s shape. Where grown masks overlap, the earlier annotation keeps
        the voxel.
    """
    if data_dir is not None:
        exact = Path(data_dir) / "masks" / f"{ct.seriesuid}.mhd"
        if exact.is_file():
            return read_label_volume(exact, ct.shape)
    labels = np.zeros(ct.shape, dtype=np.uint16)
    rows = [a for a in annotations if a.seriesuid == ct.seriesuid]
    for k, ann in enumerate(rows, start=1):
        labels[grown_mask(ct, ann) & (labels == 0)] = k
    return labels
