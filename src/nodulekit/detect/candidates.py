"""From a CT volume to nodule candidates: slice segmentation, clean-up, 3D components, crops.

Every function here works on numpy arrays and runners (callables on numpy batches), so the same
code drives PyTorch checkpoints, ONNX files and the NPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
# ... and a finding (a component, or a blob split off one) is reported from 90 % of 3 mm: the
# volume-equivalent diameter of a 3.2 mm nodule's exact mask comes out at 2.8-3.5 mm on 0.6-2 mm
# voxels, while what is smaller is a vessel's cross-section or a speck left by a split.
MIN_DIAMETER_MM = 2.7
# LUNA16 nodules are at most 30 mm: a component with a longer side, or an enclosed hole wider
# than such a nodule, is something else (vessels marked together with a nodule touching them).
MAX_NODULE_MM = 32.0
# peaks of the distance to the mask's border closer than this belong to one blob
PEAK_SPACING_MM = 5.0
# A blob of a vessel tree is the part of it that balls of this share of the blob's inscribed radius
# fill (a morphological opening): a vessel thinner than that falls away (a 4 mm nodule on a 1.5 mm
# vessel keeps its own 1.6 mm balls; the vessel has none) ...
BLOB_CORE = 0.8
# a nodule-sized component longer than this many of its volume-equivalent diameters is a blob with
# something thinner attached (a lobulated nodule reaches about 1.3)
ELONGATION = 1.5
# ... but a large blob's balls need only be thicker than the lung's vessels away from the hila (or
# half its inscribed radius), so that the lobes and bumps of a large nodule stay part of it
VESSEL_RADIUS_MM = 4.0
# A lung nodule borders aerated lung: its centre lies within its radius of lung air, which holds for
# a nodule on the pleura or the mediastinum as for one inside the lung. This margin covers the
# outline of the air threshold (partial volume, up to a 3 mm slice). A candidate farther from the
# lung is in the mediastinum or the chest wall, reached by a mark that starts at the lung's edge.
LUNG_CONTACT_MM = 3.0
# Many of the classifier's most confident false positives are its noise on one view of a crop, which
# the mean over the crop's mirror images (classify) averages away, while a nodule scores high on
# every view. Only a likely candidate is scored again, so the classifier's work grows 2-3 times
# rather than by the number of views.
VIEW_COUNTS = (1, 2, 4, 8)
VIEWS = 8
# ... when its plain crop scores this much or more
VIEWS_FROM = 0.2
# The views are pooled by their geometric mean, the mean of their log-probabilities: a nodule scores
# high on every view, so one view that scores low weighs more than one that scores high, and a
# vessel end whose noise lifts a few views above the threshold stays below it.
VIEW_MEANS = ("geometric", "arithmetic")
VIEW_MEAN = "geometric"
# a view's probability is floored here before its log is taken: a view that scores 0 would
# otherwise veto every other
_LOG_FLOOR = 1e-6


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
        diameter_mm: the volume-equivalent diameter, that of the sphere of the finding's volume (the
            ``diameter_mm`` of ``nodules.csv``, as LUNA16's tables give a nodule's size).
        volume_mm3: the volume of the finding's own voxels (``region``).
        n_voxels: those voxels' count.
        bbox: ``(slice_z, slice_y, slice_x)`` bounding box of the component.
        label: the component's label in the label volume.
        probability: nodule probability from the classifier (``nan`` until classified).
        long_axis_mm: the longest axial diameter (:func:`long_axis_mm`), as Lung-RADS measures.
        region: the finding's own voxels, ``(box, mask of the box)``: the whole component, or for a
            blob split off a vessel tree (:func:`find_candidates`) the blob's part of it.
    """

    center_irc: tuple[float, float, float]
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    n_voxels: int
    bbox: tuple[slice, slice, slice]
    label: int
    probability: float = math.nan
    long_axis_mm: float = math.nan
    region: tuple[tuple[slice, slice, slice], np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def volume_equivalent_diameter_mm(self) -> float:
        return self.diameter_mm

    def to_dict(self) -> dict:
        return {
            "center_xyz": [round(float(v), 3) for v in self.center_xyz],
            "center_irc": [round(float(v), 2) for v in self.center_irc],
            "diameter_mm": round(float(self.diameter_mm), 2),
            "long_axis_mm": round(float(self.long_axis_mm), 2),
            "volume_equivalent_diameter_mm": round(float(self.volume_equivalent_diameter_mm), 2),
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
    """Fill holes per slice, keep what lies in ``lung``, drop components under ``min_volume_mm3``.

    The U-Net often marks only the rim of a large nodule (its interior is uniform and far from any
    edge the 3x3 convolutions see); filling the enclosed holes of each slice (up to the area of a
    ``MAX_NODULE_MM`` disc, so that rings of vessels stay open) gives back a solid component whose
    centre and size are right. A large nodule on the pleura is mostly outside the lung mask (its
    solid core is tissue, and the mask's margin covers only its rim): a marked piece outside the lung
    that is nodule-sized and joined to marks inside it is kept (:func:`_in_lung`), so that the
    nodule stays whole instead of becoming a shell. A volume floor in mm^3 replaces dlwpt's 3x3
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
        sub = _in_lung(sub, lung[box], spacing_xyz)
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


def _in_lung(mask: np.ndarray, lung: np.ndarray, spacing_xyz) -> np.ndarray:
    """``mask`` inside ``lung``, plus each connected piece of it outside ``lung`` that fits in a
    ``MAX_NODULE_MM`` box and belongs to a component with marks inside: the core of a nodule on the
    pleura, not the mediastinum nor the chest wall a vessel mark runs into."""
    inside = mask & lung
    pieces, m = ndimage.label(mask & ~lung)
    if m == 0:
        return inside
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    keep = np.zeros(m + 1, dtype=bool)
    for k, box in enumerate(ndimage.find_objects(pieces), start=1):
        if (np.array([s.stop - s.start for s in box]) * spacing_zyx).max() <= MAX_NODULE_MM:
            grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            # joined to marks inside: a face neighbour, as ndimage.label connects voxels
            keep[k] = bool((ndimage.binary_dilation(pieces[grown] == k) & inside[grown]).any())
    return inside | keep[pieces]


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
    than the segmentation's outline; it is measured on its voxels (:func:`measure`).

    A component longer than ``MAX_NODULE_MM`` is a vessel tree marked together with whatever
    touches it (a recall-trained U-Net marks vessels too), or a nodule too lobulated to fit the
    box, and its centre of mass lies in none of its parts. It is split at its blobs
    (:func:`split_blobs`): each becomes one candidate for the classifier to judge, measured on its
    own voxels; a blob's lobes and the vessels ending on it are part of it, not candidates of their own.

    Args:
        hu: volume in HU.
        labels: label volume from :func:`clean_mask`.
        n: number of labels.
        ct: the :class:`~nodulekit.data.volume.CTVolume` (spacing and ``voxel_to_world``).
    """
    spacing_zyx = np.asarray(ct.spacing, dtype=float)[::-1]
    out = []
    for label, bbox in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        if bbox is None:
            continue
        comp = labels[bbox] == label
        extent_mm = np.array([s.stop - s.start for s in bbox]) * spacing_zyx
        parts = []
        if extent_mm.max() > MAX_NODULE_MM:
            parts = split_blobs(comp, spacing_zyx)
        elif extent_mm.max() > ELONGATION * measure(comp, ct.spacing, long_axis=False)[1]:
            # a nodule with a piece of vessel: the nodule, if a blob stands out (at this size, one
            # or two voxels thick, the vessel may be no peak of its own: a lower floor)
            parts = split_blobs(comp, spacing_zyx, min_radius_mm=None)
            if all(peak is not None for _, _, peak in parts):
                parts = []
        if not parts:
            parts = [(tuple(slice(0, k) for k in comp.shape), comp, None)]
        for box, mask, peak in parts:
            box = tuple(slice(b.start + s.start, b.stop + s.start) for b, s in zip(box, bbox))
            if peak is None:  # a whole blob: its HU-weighted centre of mass
                idx = np.nonzero(mask)
                weight = np.clip(hu[box][idx].astype(np.float64), HU_MIN, HU_MAX) + 1001.0
                irc = tuple(float((i * weight).sum() / weight.sum()) + s.start for i, s in zip(idx, box))
            else:  # a piece of a tube: the centre of its inscribed ball
                irc = tuple(float(c) + s.start for c, s in zip(peak, bbox))
            volume, diameter, long_axis = measure(mask, ct.spacing)
            out.append(Finding(
                center_irc=irc,
                center_xyz=tuple(float(v) for v in ct.voxel_to_world(irc)),
                diameter_mm=diameter,
                volume_mm3=volume,
                n_voxels=int(np.count_nonzero(mask)),
                bbox=bbox,
                label=label,
                long_axis_mm=long_axis,
                region=(box, mask),
            ))
    return out


def borders_lung(cand: Finding, lung: np.ndarray, spacing_xyz, *, margin_mm: float = LUNG_CONTACT_MM) -> bool:
    """Whether aerated lung (``lung``: the undilated mask of
    :func:`nodulekit.detect.lung_mask.lung_masks`) lies within the candidate's volume-equivalent
    radius plus ``margin_mm`` of its centre (see :data:`LUNG_CONTACT_MM`)."""
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    reach = cand.diameter_mm / 2 + margin_mm
    c = np.asarray(cand.center_irc, dtype=float)
    lo = np.maximum(np.floor(c - reach / spacing_zyx), 0).astype(int)
    hi = np.minimum(np.ceil(c + reach / spacing_zyx) + 1, lung.shape).astype(int)
    if (hi <= lo).any():
        return False
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.ogrid[box]
    d2 = sum(((g - ci) * s) ** 2 for g, ci, s in zip(grid, c, spacing_zyx))
    return bool((lung[box] & (d2 <= reach * reach)).any())


def measure(mask: np.ndarray, spacing_xyz, *, long_axis: bool = True) -> tuple[float, float, float]:
    """``(volume_mm3, volume_equivalent_diameter_mm, long_axis_mm)`` of a finding's voxels (the long
    axis ``nan`` without ``long_axis``)."""
    volume = float(np.count_nonzero(mask)) * float(np.prod(spacing_xyz))
    return (volume, (6.0 * volume / math.pi) ** (1.0 / 3.0),
            long_axis_mm(mask, spacing_xyz) if long_axis else math.nan)


def long_axis_mm(mask: np.ndarray, spacing_xyz) -> float:
    """The longest axial diameter of a ``(z, y, x)`` mask: the longest in-plane distance across it on
    any axial slice, pixel centres plus one pixel (as a radiologist measures a nodule for Lung-RADS)."""
    from scipy.spatial import ConvexHull
    from scipy.spatial.distance import pdist

    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    best = 0.0
    zs, rows, cols = np.nonzero(mask)
    if 1 < len(zs) <= 400:  # a small finding (most of them): all pairs at once, those of one slice
        pts = np.column_stack([cols * sx, rows * sy])
        d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(axis=2)
        return float(np.sqrt(np.where(zs[:, None] == zs[None, :], d2, 0.0).max())) + 0.5 * (sx + sy)
    for plane in mask:
        rows, cols = np.nonzero(plane)
        if rows.size > 1:
            pts = np.column_stack([cols * sx, rows * sy])
            if len(pts) > 500:  # the farthest pair lies on the convex hull ("QJ": never degenerate)
                pts = pts[ConvexHull(pts, qhull_options="QJ").vertices]
            best = max(best, float(pdist(pts).max()))
    return best + 0.5 * (sx + sy) if mask.any() else 0.0


def split_blobs(comp: np.ndarray, spacing_zyx, *, core: float = BLOB_CORE, min_radius_mm: float | None = 1.5
                ) -> list[tuple[tuple[slice, slice, slice], np.ndarray, tuple[float, float, float] | None]]:
    """The candidates of a long component: ``[(box, mask of the box, peak)]`` in its coordinates.

    Each peak of :func:`blob_peaks` (deepest first) of inscribed radius ``R`` spans the part of the
    component filled by balls of radius ``core * R`` that joins it (within ``2.5 R`` of it). If that
    part is closed, it is a blob: one candidate, ``peak`` None, and every shallower peak whose own
    ball touches it is part of it (the lobes of a large nodule, the ends of the vessels on it).
    Otherwise it is a piece of a tube as thick as the peak: the candidate is the component within
    the peak's ball, at the peak. ``min_radius_mm``: the shallowest peak (``None``: 1.5 mm, or
    ``core`` of the deepest voxel's depth if less).
    """
    spacing_zyx = np.asarray(spacing_zyx, dtype=float)
    depth = _depth(comp, spacing_zyx)
    if min_radius_mm is None:
        min_radius_mm = min(1.5, core * float(depth.max()))
    peaks = _peaks(depth, spacing_zyx, min_radius_mm=min_radius_mm)
    shape = np.array(comp.shape)
    blobs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (lo, hi, voxels) mm of the blobs so far
    out = []
    for center, radius in peaks:
        c = np.asarray(center)
        if any(_near(blob, c * spacing_zyx, radius + 0.5 * spacing_zyx.max()) for blob in blobs):
            continue
        rho = min(core * radius, max(VESSEL_RADIUS_MM, 0.5 * radius))
        half = np.ceil((2.5 * radius + 2.0) / spacing_zyx).astype(int)
        lo, hi = np.maximum(np.round(c).astype(int) - half, 0), np.minimum(np.round(c).astype(int) + half + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        cores, _ = ndimage.label(depth[box] >= rho)
        own = cores == (cores[tuple(np.clip(np.round(c).astype(int) - lo, 0, hi - lo - 1))] or -1)
        cut = [(a > 0, b < n) for a, b, n in zip(lo, hi, shape)]
        closed = own.any() and not any(
            (first and own.take(0, axis=k).any()) or (last and own.take(-1, axis=k).any())
            for k, (first, last) in enumerate(cut))
        if closed:
            pad = np.ceil(rho / spacing_zyx).astype(int) + 1
            plo, phi = np.maximum(lo - pad, 0), np.minimum(hi + pad, shape)
            pbox = tuple(slice(a, b) for a, b in zip(plo, phi))
            seed = np.zeros(phi - plo, dtype=bool)
            seed[tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, plo))] = own
            mask = comp[pbox] & (ndimage.distance_transform_edt(~seed, sampling=spacing_zyx) <= rho + 1e-6)
            pts = (np.argwhere(mask) + plo) * spacing_zyx
            if len(pts):
                blobs.append((pts.min(axis=0), pts.max(axis=0), pts))
            out.append((pbox, mask, None))
        else:
            out.append(_ball(comp, c, radius + 0.5 * spacing_zyx.max(), spacing_zyx) + (center,))
    return out


def _near(blob: tuple[np.ndarray, np.ndarray, np.ndarray], p_mm: np.ndarray, reach: float) -> bool:
    """Whether a voxel of ``blob`` (``(lo, hi, points)``, mm) lies within ``reach`` of ``p_mm``; its
    box first (a vessel tree has hundreds of peaks, most far from any blob)."""
    lo, hi, points = blob
    if np.any(p_mm < lo - reach) or np.any(p_mm > hi + reach):
        return False
    return float(((points - p_mm) ** 2).sum(axis=1).min()) <= reach ** 2


def _ball(comp: np.ndarray, c: np.ndarray, reach: float, spacing_zyx: np.ndarray):
    """``(box, mask)``: the part of ``comp`` within ``reach`` mm of the voxel position ``c``."""
    lo = [max(int(np.floor(ci - reach / s)), 0) for ci, s in zip(c, spacing_zyx)]
    hi = [min(int(np.ceil(ci + reach / s)) + 1, n) for ci, s, n in zip(c, spacing_zyx, comp.shape)]
    box = tuple(slice(a, max(a, b)) for a, b in zip(lo, hi))
    grid = np.ogrid[box]
    dist2 = sum(((g - ci) * s) ** 2 for g, ci, s in zip(grid, c, spacing_zyx))
    return box, comp[box] & (dist2 <= reach ** 2)


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
    return _peaks(_depth(comp, spacing_zyx), spacing_zyx, min_radius_mm=min_radius_mm, spacing_mm=spacing_mm)


def _depth(comp: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Each voxel's distance (mm) to the border of ``comp``, float32.

    The slow part of the components stage on a real scan: the exact Euclidean distance transform of
    each vessel tree's bounding box (a few dozen trees spanning much of the lung, tens of millions of
    voxels in all). A cheaper distance (chamfer) or a coarser grid would move the peaks.
    """
    # a frame of background: a voxel on the box's face is one voxel from the outside, not as deep
    # as the nearest background inside the box (a one-slice component would be as deep as it is long)
    depth = ndimage.distance_transform_edt(np.pad(comp, 1), sampling=spacing_zyx)
    return depth[(slice(1, -1),) * comp.ndim].astype(np.float32)


def _peaks(depth: np.ndarray, spacing_zyx: np.ndarray, *, min_radius_mm: float = 1.5,
           spacing_mm: float = PEAK_SPACING_MM) -> list[tuple[tuple[float, float, float], float]]:
    """:func:`blob_peaks` of a component's distance map."""
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
    mm = centers * spacing_zyx
    reach = np.maximum(radii, spacing_mm)
    kept: list[int] = []
    for i in order:
        if not kept or np.all(np.linalg.norm(mm[kept] - mm[i], axis=1) > reach[kept]):
            kept.append(int(i))
    return [(tuple(float(v) for v in centers[i]), float(radii[i])) for i in kept]


def check_views(views: int, views_from: float, view_mean: str = VIEW_MEAN) -> None:
    """Raise ValueError unless ``views`` is one of :data:`VIEW_COUNTS`, ``views_from`` a
    probability and ``view_mean`` one of :data:`VIEW_MEANS`: :func:`classify`'s own check, which a
    batch runs before its first scan."""
    if views not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, got {views!r}")
    if not (math.isfinite(views_from) and 0.0 <= views_from <= 1.0):
        raise ValueError(f"views_from must be a probability in [0, 1], got {views_from!r}")
    if view_mean not in VIEW_MEANS:
        raise ValueError(f"view_mean must be one of {VIEW_MEANS}, got {view_mean!r}")


def pool_views(probs: np.ndarray, view_mean: str = VIEW_MEAN) -> np.ndarray:
    """``(views, N)`` probabilities -> ``(N,)``: their geometric or arithmetic mean (:data:`VIEW_MEAN`)."""
    probs = np.asarray(probs, dtype=np.float64)
    if view_mean == "arithmetic":
        return probs.mean(axis=0)
    return np.exp(np.log(np.clip(probs, _LOG_FLOOR, 1.0)).mean(axis=0))


def flip_views(n: int) -> list[tuple[int, ...]]:
    """The first ``n`` of the 8 mirror images of a ``(N, C, D, H, W)`` crop, as the axes each flips:
    the crop itself, then across the slices, the rows and the columns, then their pairs and all three."""
    if n not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, got {n!r}")
    return [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)][:n]


def classify(ct, candidates: list[Finding], runner: Callable[[np.ndarray], np.ndarray],
             *, batch_size: int = 32, size=CLS_CROP, views: int = VIEWS, views_from: float = VIEWS_FROM,
             view_mean: str = VIEW_MEAN, timings: dict | None = None) -> None:
    """Set ``probability`` of each candidate from the classifier runner (in place).

    Crops are cut at the runner's ``crop_spacing`` (mm per voxel; ``None``: native voxels), the
    voxel size its model was trained on, with a context channel when the runner has ``context``,
    by :func:`nodulekit.detect.crops.cls_crops`. The
    runner gets ``batch_size`` crops a call (a runtime with a fixed batch splits them itself).

    A candidate the plain crop scores at ``views_from`` or more is scored again on the crop's
    mirror images (:func:`flip_views`), and its probability is the ``view_mean`` of the ``views``
    (:func:`pool_views`). The classifier's errors on one view are partly its own noise, which the
    mean averages out; the candidates below ``views_from`` are left with one view, which keeps the
    cost at about a third of scoring every view of every candidate.
    ``timings`` (a dict) gets ``crops`` and ``cls_network``, seconds spent cutting and running.

    What bounds this stage is the classifier's 3D convolutions: about 0.3 GMAC a crop, on a
    thousand candidates of a real thin-slice scan a few seconds on two cores, int8 or not.
    """
    import time

    from nodulekit.detect.crops import cls_crops

    check_views(views, views_from, view_mean)
    flips = flip_views(views)[1:]
    spacing, context = getattr(runner, "crop_spacing", None), getattr(runner, "context", None)

    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(runner(x[i: i + batch_size]), dtype=np.float64).reshape(-1)
                               for i in range(0, len(x), batch_size)])

    t_crop = t_net = 0.0
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start: start + batch_size]
        t0 = time.perf_counter()
        x = cls_crops(ct.hu, ct.spacing, [c.center_irc for c in chunk], size, spacing, context)
        t1 = time.perf_counter()
        probs = run(x)
        again = np.flatnonzero(probs >= views_from) if flips else np.empty(0, dtype=np.intp)
        if again.size:
            sel = x[again]
            mirrored = np.concatenate([np.ascontiguousarray(np.flip(sel, axis=axes)) for axes in flips])
            probs[again] = pool_views(np.vstack([probs[again][None], run(mirrored).reshape(len(flips), again.size)]),
                                      view_mean)
        t_crop, t_net = t_crop + t1 - t0, t_net + time.perf_counter() - t1
        for c, p in zip(chunk, probs):
            c.probability = float(p)
    if timings is not None:
        timings.update(crops=t_crop, cls_network=t_net)
