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

from nodulekit import CLS_CROP, HU_MAX, HU_MIN, SEG_THRESHOLD
from nodulekit.data.seg_input import seg_context
from nodulekit.detect.lung_mask import fill_holes_per_slice

# U-Net inputs must be a multiple of 2**(depth-1) on each side; 16 covers depths up to 5.
_SIZE_MULTIPLE = 16
# LUNA16 counts nodules from 3 mm; a 3 mm sphere is 14 mm^3. Half of it leaves room for the
# segmentation under-reaching a small nodule while still dropping specks of one or two voxels.
MIN_VOLUME_MM3 = 7.0
# LUNA16 nodules are at most 30 mm: a component with a longer side, or an enclosed hole wider
# than such a nodule, is something else (vessels marked together with a nodule touching them).
MAX_NODULE_MM = 32.0
# peaks of the distance to the mask's border closer than this belong to one blob
PEAK_SPACING_MM = 5.0


@dataclass
class Finding:
    """One connected component of the thresholded segmentation: a place the detector proposes.

    Not a :class:`nodulekit.data.luna.Candidate`, which is a row of a LUNA16 candidates table (a
    seriesuid, a world centre and a ground-truth class). A finding is measured on a segmentation:
    it has a voxel centre, a size, a bounding box and a label in its scan's label volume, and no
    ground truth, only the classifier's ``probability``. :mod:`nodulekit.detect.mine` turns
    findings into table candidates (class 0) where it needs them.

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
    """The network input for ``slices``: ``(N, 7, H, W)`` float32, the training input of each
    (:func:`~nodulekit.data.seg_input.seg_context`: HU clipped, neighbours clamped at the volume ends)."""
    return np.stack([seg_context(hu, int(z)) for z in slices])


def receptive_radius(depth: int) -> int:
    """Pixels on each side of an output pixel that the padded U-Net of ``depth`` levels sees: two 3x3
    convs per level on the way down and up, scaled by each level's down-sampling, plus the pooling
    and transposed-conv windows (22 for depth 3, 46 for depth 4)."""
    return 3 * 2 ** depth - 2


def lung_box(rows_any: np.ndarray, cols_any: np.ndarray, depth: int) -> tuple[int, int, int, int] | None:
    """The part of a slice to segment around the lung: ``(r0, r1, c0, c1)``, or None without lung.

    The lung's bounding box grows by the U-Net's receptive radius, so that every output pixel inside
    the lung sees the same input as on the whole slice; its corners snap outwards to multiples of the
    down-sampling factor (at least 8), so the pooling grid is the whole slice's and each side stays a
    size the U-Net takes. ``r1`` / ``c1`` may pass the slice's end by less than one multiple (padded
    with air, as the whole slice is).
    """
    rows, cols = np.flatnonzero(rows_any), np.flatnonzero(cols_any)
    if not len(rows) or not len(cols):
        return None
    m = max(8, 2 ** (depth - 1))
    margin = receptive_radius(depth)
    h, w = len(rows_any), len(cols_any)

    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        start = max(0, (lo - margin) // m * m)
        stop = min(-(-(hi + 1 + margin) // m) * m, n + (-n % m))
        return start, stop

    return (*span(int(rows[0]), int(rows[-1]), h), *span(int(cols[0]), int(cols[-1]), w))


def segment_slices(
    hu: np.ndarray,
    runner: Callable[[np.ndarray], np.ndarray],
    slices: Iterable[int],
    *,
    threshold: float = SEG_THRESHOLD,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
    lung: np.ndarray | None = None,
) -> np.ndarray:
    """Run the segmentation runner on ``slices`` and threshold its probabilities.

    With ``lung`` and a runner that knows its U-Net's depth (``unet_depth``; every CPU runner
    does), each batch is cut to the box around its slices' lung (:func:`lung_box`): the
    probabilities inside the lung are those of the whole slice, the pixels outside the box stay
    background, and the network runs on fewer pixels (on a chest CT, most of the saving is above and
    below the lung's widest slices).

    What bounds this stage is the U-Net's convolutions on the lung's slices (about 6.6 GMAC a
    512x512 slice for the default widths): the runtime (OpenVINO fuses conv + ReLU + BatchNorm;
    its int8 IR runs VNNI kernels) and a pruned model are what make it faster, not this loop.

    Args:
        hu: volume (index, row, col) in HU.
        runner: ``(N, 7, H, W) -> (N, 1, H, W)`` probabilities.
        slices: slice indices to segment; the others stay background.
        threshold: probability above which a voxel is nodule.
        batch_size: slices per runner call.
        on_batch: called with the number of slices done after each batch (progress bars).
        lung: ``bool`` lung mask of the shape of ``hu``; ``None``: whole slices.

    Returns:
        ``bool`` mask of the shape of ``hu``.
    """
    slices = list(slices)
    mask = np.zeros(hu.shape, dtype=bool)
    h, w = hu.shape[1:]
    depth = getattr(runner, "unet_depth", None)
    if lung is not None and depth:
        rows_any, cols_any = lung.any(axis=2), lung.any(axis=1)
    for start in range(0, len(slices), batch_size):
        chunk = slices[start: start + batch_size]
        box = None
        if lung is not None and depth:
            box = lung_box(rows_any[chunk].any(axis=0), cols_any[chunk].any(axis=0), depth)
        r0, r1, c0, c1 = box or (0, h + (-h % _SIZE_MULTIPLE), 0, w + (-w % _SIZE_MULTIPLE))
        rows, cols = slice(r0, min(r1, h)), slice(c0, min(c1, w))
        x = np.stack([seg_context(hu, int(z), rows, cols) for z in chunk])
        pad_h, pad_w = r1 - r0 - x.shape[2], c1 - c0 - x.shape[3]
        if pad_h or pad_w:
            x = np.pad(x, [(0, 0), (0, 0), (0, pad_h), (0, pad_w)], constant_values=HU_MIN)
        prob = np.asarray(runner(x))[:, 0, : rows.stop - r0, : cols.stop - c0]
        mask[chunk, rows, cols] = prob > threshold
        if on_batch:
            on_batch(len(chunk))
    return mask


def clean_mask(mask: np.ndarray, lung: np.ndarray | None, spacing_xyz, *,
               min_volume_mm3: float = MIN_VOLUME_MM3) -> tuple[np.ndarray, int]:
    """Fill holes per slice, keep the part inside ``lung``, drop components under ``min_volume_mm3``.

    The U-Net often marks only the rim of a large nodule (its interior is uniform and far from any
    edge the 3x3 convolutions see); filling the enclosed holes of each slice (up to the area of a
    ``MAX_NODULE_MM`` disc, so that rings of vessels stay open) gives back a solid component whose
    centre and size are right. A volume floor in mm^3 replaces dlwpt's 3x3
    erosion: it drops the same one-voxel specks without shrinking small nodules, and means the
    same on thin- and thick-slice scans.

    Returns:
        ``(labels, n)``: int32 label volume (1..n) of the kept components.
    """
    out = np.zeros(mask.shape, dtype=np.int32)
    box = _bbox(mask, frame=1)
    if box is None:
        return out, 0
    # everything below runs on the box around the marked voxels plus a one-voxel frame of
    # background: the same holes and components as on the whole volume (the frame connects the
    # outside as the volume's border does), and labels in the same raster order
    sub = mask[box].copy()
    max_hole_px = math.pi * (MAX_NODULE_MM / 2) ** 2 / (spacing_xyz[0] * spacing_xyz[1])
    fill_holes_per_slice(sub, max_hole_px)
    if lung is not None:
        sub &= lung[box]
    labels, n = ndimage.label(sub)
    if n == 0:
        return out, 0
    voxel_mm3 = float(np.prod(spacing_xyz))
    keep = np.bincount(labels.ravel(), minlength=n + 1) * voxel_mm3 >= min_volume_mm3
    keep[0] = False
    new_ids = np.zeros(n + 1, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    out[box] = new_ids[labels]
    return out, int(keep.sum())


def _bbox(mask: np.ndarray, frame: int = 0) -> tuple[slice, ...] | None:
    """The bounding box of ``mask``'s True voxels grown by ``frame`` voxels (clipped), or None."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if not len(idx):
            return None
        box.append(slice(max(int(idx[0]) - frame, 0), min(int(idx[-1]) + 1 + frame, mask.shape[axis])))
    return tuple(box)


def find_candidates(hu: np.ndarray, labels: np.ndarray, n: int, ct) -> list[Finding]:
    """Centre, size and world position of each labelled component.

    A nodule-sized component is one candidate. Its centre is the centre of mass weighted by
    ``HU + 1001`` (HU clipped to [-1000, 1000], as dlwpt does), so it sits on the dense core rather
    than the segmentation's outline; its diameter is that of the sphere of its volume.

    A component longer than ``MAX_NODULE_MM`` is a vessel tree marked together with whatever
    touches it (a recall-trained U-Net marks vessels too), and its centre of mass lies in none of
    its parts. It is split at the blobs along it (:func:`blob_peaks`): each becomes a candidate for
    the classifier to judge, with the blob's diameter.

    Args:
        hu: volume in HU.
        labels: label volume from :func:`clean_mask`.
        n: number of labels.
        ct: the :class:`~nodulekit.data.volume.CTVolume` (spacing and ``voxel_to_world``).
    """
    voxel_mm3 = float(np.prod(ct.spacing))
    spacing_zyx = np.asarray(ct.spacing, dtype=float)[::-1]
    out = []
    for label, bbox in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        if bbox is None:
            continue
        comp = labels[bbox] == label
        extent_mm = np.array([s.stop - s.start for s in bbox]) * spacing_zyx
        if extent_mm.max() > MAX_NODULE_MM:
            for irc, radius in blob_peaks(comp, spacing_zyx):
                irc = tuple(float(c) + s.start for c, s in zip(irc, bbox))
                d = 2.0 * radius
                out.append(Finding(
                    center_irc=irc,
                    center_xyz=tuple(float(v) for v in ct.voxel_to_world(irc)),
                    diameter_mm=d,
                    volume_mm3=math.pi / 6 * d ** 3,
                    n_voxels=int(round(math.pi / 6 * d ** 3 / voxel_mm3)),
                    bbox=bbox,
                    label=label,
                ))
            continue
        idx = np.nonzero(comp)
        weight = np.clip(hu[bbox][idx].astype(np.float64), HU_MIN, HU_MAX) + 1001.0
        total = weight.sum()
        irc = tuple(float((i * weight).sum() / total) + s.start for i, s in zip(idx, bbox))
        count = len(idx[0])
        volume = count * voxel_mm3
        out.append(Finding(
            center_irc=irc,
            center_xyz=tuple(float(v) for v in ct.voxel_to_world(irc)),
            diameter_mm=(6.0 * volume / math.pi) ** (1.0 / 3.0),
            volume_mm3=volume,
            n_voxels=count,
            bbox=bbox,
            label=label,
        ))
    return out


def blob_peaks(comp: np.ndarray, spacing_zyx, *, min_radius_mm: float = 1.5,
               spacing_mm: float = PEAK_SPACING_MM) -> list[tuple[tuple[float, float, float], float]]:
    """Centres and radii of the blobs of a binary component: local maxima of the distance to its
    border (in mm) at least ``min_radius_mm`` deep, at most one per ``spacing_mm`` neighbourhood,
    and none inside a deeper blob.

    On a vessel tree with a nodule attached, the nodule's centre is the deepest point around (its
    radius beats the vessel's), so it comes out as its own peak; the rest of the tree gives peaks
    along the thicker vessels, which the classifier rejects.

    Returns:
        ``[((index, row, col), radius_mm)]``, deepest first.
    """
    spacing_zyx = np.asarray(spacing_zyx, dtype=float)
    # The slow part of the components stage on a real scan: the exact Euclidean distance transform
    # of each vessel tree's bounding box (a few dozen trees spanning much of the lung, tens of
    # millions of voxels in all). A cheaper distance (chamfer) or a coarser grid would move the peaks.
    depth = ndimage.distance_transform_edt(comp, sampling=spacing_zyx).astype(np.float32)
    size = np.maximum(1, np.round(spacing_mm / spacing_zyx)).astype(int) | 1
    peaks = (depth == ndimage.maximum_filter(depth, size=tuple(size))) & (depth >= min_radius_mm)
    # plateaus give several equal maxima: keep one per connected piece
    plateau, n = ndimage.label(peaks)
    if n == 0:
        return []
    # centre and depth of each plateau from its own few voxels (ndimage's per-label measurements
    # sweep and sort the whole box once per call)
    idx = np.nonzero(peaks)
    lab = plateau[idx]
    count = np.bincount(lab, minlength=n + 1)[1:]
    centers = np.stack([np.bincount(lab, weights=i, minlength=n + 1)[1:] for i in idx], axis=1) / count[:, None]
    radii = np.zeros(n + 1)
    np.maximum.at(radii, lab, depth[idx])
    radii = radii[1:]
    order = np.argsort(-radii)
    kept: list[int] = []
    for i in order:
        mm = centers[i] * spacing_zyx
        if all(np.linalg.norm(mm - centers[j] * spacing_zyx) > max(radii[j], spacing_mm) for j in kept):
            kept.append(int(i))
    return [(tuple(float(v) for v in centers[i]), float(radii[i])) for i in kept]


def classify(ct, candidates: list[Finding], runner: Callable[[np.ndarray], np.ndarray],
             *, batch_size: int = 32, size=CLS_CROP, timings: dict | None = None) -> None:
    """Set ``probability`` of each candidate from the classifier runner (in place).

    Crops are cut at the runner's ``crop_spacing`` (mm per voxel; ``None``: native voxels), the
    voxel size its model was trained on, by :func:`nodulekit.detect.crops.cls_crops`. The
    runner gets ``batch_size`` crops a call (a runtime with a fixed batch splits them itself).
    ``timings`` (a dict) gets ``crops`` and ``cls_network``, seconds spent cutting and running.

    What bounds this stage is the classifier's 3D convolutions: about 0.3 GMAC a crop, on a
    thousand candidates of a real thin-slice scan a few seconds on two cores, int8 or not.
    """
    import time

    from nodulekit.detect.crops import cls_crops

    spacing = getattr(runner, "crop_spacing", None)
    t_crop = t_net = 0.0
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start: start + batch_size]
        t0 = time.perf_counter()
        x = cls_crops(ct.hu, ct.spacing, [c.center_irc for c in chunk], size, spacing)
        t1 = time.perf_counter()
        probs = np.asarray(runner(x), dtype=np.float64).reshape(-1)
        t_crop, t_net = t_crop + t1 - t0, t_net + time.perf_counter() - t1
        for c, p in zip(chunk, probs):
            c.probability = float(p)
    if timings is not None:
        timings.update(crops=t_crop, cls_network=t_net)
