"""From a CT volume to nodule candidates: slice segmentation, clean-up, 3D components, crops.

Every function here works on numpy arrays and runners (callables on numpy batches), so the same
code drives PyTorch checkpoints, ONNX files and the NPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nodulekit import CLS_CROP, CONTEXT_SLICES, HU_MAX, HU_MIN

# U-Net inputs must be a multiple of 2**(depth-1) on each side; 16 covers depths up to 5.
_SIZE_MULTIPLE = 16
# LUNA16 counts nodules from 3 mm; a 3 mm sphere is 14 mm^3. Half of it leaves room for the
# segmentation under-reaching a small nodule while still dropping specks of one or two voxels.
MIN_VOLUME_MM3 = 7.0


@dataclass
class Candidate:
    """One connected component of the thresholded segmentation.

    Attributes:
        center_irc: HU-weighted centre of mass, continuous (index, row, col).
        center_xyz: the same point in world coordinates (x, y, z) mm.
        diameter_mm: diameter of the sphere of the component's volume.
        volume_mm3: component volume.
        n_voxels: component size in voxels.
        bbox: ``(slice_z, slice_y, slice_x)`` bounding box of the component.
        label: the component's label in the label volume.
        probability: nodule probability from the classifier (``nan`` until classified).
    """

    center_irc: tuple[float, float, float]
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    n_voxels: int
    bbox: tuple[slice, slice, slice]
    label: int
    probability: float = math.nan

    def to_dict(self) -> dict:
        return {
            "center_xyz": [round(float(v), 3) for v in self.center_xyz],
            "center_irc": [round(float(v), 2) for v in self.center_irc],
            "diameter_mm": round(float(self.diameter_mm), 2),
            "volume_mm3": round(float(self.volume_mm3), 2),
            "n_voxels": int(self.n_voxels),
            "probability": None if math.isnan(self.probability) else round(float(self.probability), 6),
        }


def seg_batch(hu: np.ndarray, slices: Iterable[int]) -> np.ndarray:
    """The network input for ``slices``: ``(N, 7, H, W)`` float32, HU clipped, neighbours clamped
    at the volume ends."""
    depth = hu.shape[0]
    idx = np.array([[min(max(z + k, 0), depth - 1) for k in range(-CONTEXT_SLICES, CONTEXT_SLICES + 1)]
                    for z in slices])
    return np.clip(hu[idx].astype(np.float32, copy=False), HU_MIN, HU_MAX)


def segment_slices(
    hu: np.ndarray,
    runner: Callable[[np.ndarray], np.ndarray],
    slices: Iterable[int],
    *,
    threshold: float = 0.5,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run the segmentation runner on ``slices`` and threshold its probabilities.

    Args:
        hu: volume (index, row, col) in HU.
        runner: ``(N, 7, H, W) -> (N, 1, H, W)`` probabilities.
        slices: slice indices to segment; the others stay background.
        threshold: probability above which a voxel is nodule.
        batch_size: slices per runner call.
        on_batch: called with the number of slices done after each batch (progress bars).

    Returns:
        ``bool`` mask of the shape of ``hu``.
    """
    slices = list(slices)
    mask = np.zeros(hu.shape, dtype=bool)
    h, w = hu.shape[1:]
    pad_h, pad_w = -h % _SIZE_MULTIPLE, -w % _SIZE_MULTIPLE
    for start in range(0, len(slices), batch_size):
        chunk = slices[start: start + batch_size]
        x = seg_batch(hu, chunk)
        if pad_h or pad_w:
            x = np.pad(x, [(0, 0), (0, 0), (0, pad_h), (0, pad_w)], constant_values=HU_MIN)
        prob = np.asarray(runner(x))[:, 0, :h, :w]
        mask[chunk] = prob > threshold
        if on_batch:
            on_batch(len(chunk))
    return mask


def clean_mask(mask: np.ndarray, lung: np.ndarray | None, spacing_xyz, *,
               min_volume_mm3: float = MIN_VOLUME_MM3) -> tuple[np.ndarray, int]:
    """Keep the part of ``mask`` inside ``lung`` and drop components under ``min_volume_mm3``.

    A volume floor in mm^3 replaces dlwpt's 3x3 erosion: it drops the same one-voxel specks
    without shrinking small nodules, and means the same on thin- and thick-slice scans.

    Returns:
        ``(labels, n)``: int32 label volume (1..n) of the kept components.
    """
    if lung is not None:
        mask = mask & lung
    labels, n = ndimage.label(mask)
    if n == 0:
        return labels.astype(np.int32), 0
    voxel_mm3 = float(np.prod(spacing_xyz))
    keep = np.bincount(labels.ravel(), minlength=n + 1) * voxel_mm3 >= min_volume_mm3
    keep[0] = False
    new_ids = np.zeros(n + 1, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels], int(keep.sum())


def find_candidates(hu: np.ndarray, labels: np.ndarray, n: int, ct) -> list[Candidate]:
    """Centre, size and world position of each labelled component.

    The centre is the centre of mass weighted by ``HU + 1001`` (HU clipped to [-1000, 1000], as
    dlwpt does), so it sits on the dense core rather than the segmentation's outline.

    Args:
        hu: volume in HU.
        labels: label volume from :func:`clean_mask`.
        n: number of labels.
        ct: the :class:`~nodulekit.data.volume.CTVolume` (spacing and ``voxel_to_world``).
    """
    voxel_mm3 = float(np.prod(ct.spacing))
    out = []
    for label, bbox in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        if bbox is None:
            continue
        comp = labels[bbox] == label
        weight = np.clip(hu[bbox].astype(np.float32), HU_MIN, HU_MAX) + 1001.0
        weight[~comp] = 0.0
        irc = tuple(float(c) + s.start for c, s in zip(ndimage.center_of_mass(weight), bbox))
        count = int(comp.sum())
        volume = count * voxel_mm3
        out.append(Candidate(
            center_irc=irc,
            center_xyz=tuple(float(v) for v in ct.voxel_to_world(irc)),
            diameter_mm=(6.0 * volume / math.pi) ** (1.0 / 3.0),
            volume_mm3=volume,
            n_voxels=count,
            bbox=bbox,
            label=label,
        ))
    return out


def crop(hu: np.ndarray, center_irc, size=CLS_CROP) -> np.ndarray:
    """A ``size`` crop (index, row, col) centred on ``center_irc``, padded with -1000 HU outside the
    volume and clipped to [-1000, 1000]."""
    out = np.full(size, HU_MIN, dtype=np.float32)
    src, dst = [], []
    for c, s, dim in zip(center_irc, size, hu.shape):
        start = int(round(c)) - s // 2
        lo, hi = max(start, 0), min(start + s, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = np.clip(hu[tuple(src)], HU_MIN, HU_MAX)
    return out


def classify(hu: np.ndarray, candidates: list[Candidate], runner: Callable[[np.ndarray], np.ndarray],
             *, batch_size: int = 16, size=CLS_CROP) -> None:
    """Set ``probability`` of each candidate from the classifier runner (in place)."""
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start: start + batch_size]
        x = np.stack([crop(hu, c.center_irc, size) for c in chunk])[:, None]
        probs = np.asarray(runner(x), dtype=np.float64).reshape(-1)
        for c, p in zip(chunk, probs):
            c.probability = float(p)
