"""One synthetic chest CT: anatomy, vessels, airways, nodules, scanner, and the candidate list."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

import nodulekit.data.synth.hila as hila_mod
import nodulekit.data.synth.nodules as nod
import nodulekit.data.synth.skeleton as skeleton
import nodulekit.data.synth.vessels as vessels
from nodulekit.data.synth.anatomy import CoarseFields, compose, sample_anatomy, table_slice
from nodulekit.data.synth.scanner import (MAX_DEFAULT_SLICES, Grid, blur_and_noise, flip_geometry,
                                          sample_acquisition, to_int16)
from nodulekit.data.synth.tubes import paint
from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError

UID_ROOT = "1.3.6.1.4.1.55555"
# Raised whenever the same seed would draw different scans, so that a draw written by an older
# generator is not reused as if it were this one's (synth.json's ``parameters.version``)
GENERATOR_VERSION = 2
# Scans of thinner slices are drawn as they are; thicker ones on sub-slices this far apart at most,
# averaged into their slices (:func:`slice_samples`)
SUB_SLICE_MM = 0.9
# The slice spacing of a thick-slice scan (``thick_share``): routine clinical chest CT is often
# reconstructed at 3 mm, beyond LUNA16's 2.5 mm, and there a vessel cut obliquely or end-on is a
# small blob on a single slice that a model trained on thinner slices only has never seen
THICK_SLICE_MM = 3.0


@dataclass
class SyntheticScan:
    """A generated scan.

    Attributes:
        ct: the volume, int16 HU.
        labels: uint16 array of ``ct``'s shape; 0 background, k = the k-th entry of ``nodules``.
        nodules: annotated findings (3-30 mm), each a :class:`~nodulekit.data.synth.nodules.Nodule`.
        excluded: findings below 3 mm (drawn, not labelled), same type.
        negatives: class-0 candidates, world (x, y, z) mm.
        meta: scan parameters (spacing, kernel, dose, flip, ...), plain values.
    """

    ct: CTVolume
    labels: np.ndarray
    nodules: list
    excluded: list
    negatives: list
    meta: dict = field(default_factory=dict)


def series_uid(seed: int, index: int) -> str:
    """Deterministic DICOM-like series UID of scan ``index`` of a dataset drawn with ``seed``."""
    tail = np.random.default_rng([seed, index, 7]).integers(10**11, 10**12)
    return f"{UID_ROOT}.{seed}.{index}.{tail}"


def generate_scan(seed: int, index: int, *, size: int = 512, max_slices: int | None = None,
                  hila: str = "simple", thick_share: float = 0.0) -> SyntheticScan:
    """Generate scan ``index`` of the dataset drawn with ``seed`` (deterministic).

    Args:
        seed: dataset seed (non-negative).
        index: scan number within the dataset.
        size: in-plane voxels per side; below 512 the spacing grows by 512/size so the field of
            view stays a real chest.
        max_slices: cap on the slice count; the z-extent shrinks around the middle of the lungs.
        hila: ``simple`` (each lung's artery, vein and bronchus trees grow from one trunk) or
            ``lobar`` (lobar trunks branching at the hilum, superior and inferior veins, hilar lymph
            nodes: :mod:`nodulekit.data.synth.hila`). The same seed draws another scan with each.
        thick_share: the share of scans reconstructed at ``THICK_SLICE_MM`` instead of LUNA16's
            spacings (0 to 1). Which scans are thick comes from a stream of its own: a scan that
            stays thin is the scan drawn without the option, and a thick one has its body and lungs.

    Returns:
        A :class:`SyntheticScan`.
    """
    return render_scan(seed, index, size=size, max_slices=max_slices, hila=hila, thick_share=thick_share)


def check_thick_share(thick_share: float) -> float:
    """``thick_share`` as a float, or an :class:`InputError` when it is not a share (0 to 1)."""
    share = float(thick_share)
    if not 0.0 <= share <= 1.0:  # also refuses NaN
        raise InputError("synth", f"thick_share must be between 0 and 1, got {thick_share}")
    return share


def is_thick(seed: int, index: int, thick_share: float) -> bool:
    """Whether scan ``index`` of the draw ``seed`` is reconstructed at ``THICK_SLICE_MM``."""
    return thick_share > 0 and np.random.default_rng([seed, index, 3000]).uniform() < thick_share


def render_scan(seed: int, index: int, *, size: int = 512, max_slices: int | None = None,
                flip: str | None = None, hila: str = "simple", thick_share: float = 0.0) -> SyntheticScan:
    """:func:`generate_scan` with an optional forced storage flip (``''``, ``'x'``, ``'y'``, ``'z'``)."""
    if hila not in hila_mod.HILA:
        raise InputError("synth", f"hila must be one of {', '.join(hila_mod.HILA)}, got {hila!r}")
    lobar = hila == "lobar"
    thick_share = check_thick_share(thick_share)
    if seed < 0 or index < 0:
        raise InputError("synth", f"seed and index must be >= 0, got {seed}, {index}")
    if size < 64 or (max_slices is not None and max_slices < 8):
        raise InputError("synth", f"size must be >= 64 and max_slices >= 8, got {size}, {max_slices}")
    rng = np.random.default_rng([seed, index, 55555])
    an = sample_anatomy(rng)
    acq = sample_acquisition(rng, size, an.body_width)
    if is_thick(seed, index, thick_share):
        acq = replace(acq, spacing=(acq.spacing[0], acq.spacing[1], THICK_SLICE_MM))
    flip_axis = acq.flip if flip is None else flip
    sx, _, sz = acq.spacing
    fov = acq.fov_mm

    ox = -fov / 2 + rng.uniform(-6, 6)
    oy = -fov / 2 + rng.uniform(-15, 15)
    an.cx = ox + fov / 2 + rng.uniform(-8, 8)
    body_top = an.Ba + 0.7 * an.wall
    body_bot = an.Bp + 0.9 * an.wall + 32
    an.yc = oy + fov * rng.uniform(0.47, 0.52) + (body_top - body_bot) / 2
    an.z0 = rng.uniform(-380, -170)
    h_lo, h_hi = -rng.uniform(15, 45), an.H + rng.uniform(10, 40)
    n = int(np.ceil((h_hi - h_lo) / sz)) + 1
    cap = min(MAX_DEFAULT_SLICES, max_slices or MAX_DEFAULT_SLICES)
    if n > cap:
        n = cap
        h_lo = 0.5 * an.H - (n - 1) * sz / 2
    fine = Grid((n, size, size), (ox, oy, an.z0 + h_lo), acq.spacing)
    # the anatomy is drawn on sub-slices and each reconstructed slice is their mean: a slice
    # sensitivity profile as wide as the spacing, which blurs what a thick slice cuts obliquely (a
    # vessel becomes a faint smear, a small nodule a fainter blob) as a scanner's slices do
    sub = slice_samples(sz)
    g = fine if sub == 1 else Grid((n * sub, size, size), (ox, oy, an.z0 + h_lo - sz / 2 + sz / (2 * sub)),
                                   (sx, sx, sz / sub))
    cs = max(2.5, fov / 128)
    ch_lo, ch_hi = min(h_lo, -50.0) - 6, max(h_lo + (n - 1) * sz, an.H + 50) + 6
    coarse = Grid((int((ch_hi - ch_lo) / 4.0) + 2, int((fov + 20) / cs) + 2, int((fov + 20) / cs) + 2),
                  (ox - 10, oy - 10, an.z0 + ch_lo), (cs, cs, 4.0))
    cf = CoarseFields(an, coarse, rng)

    hu, lung = compose(an, cf, g, table_slice(an, g, rng))
    ribs = skeleton.rib_paths(an, rng)
    skeleton.render_ribs(hu, g, ribs)
    skeleton.render_spine(hu, g, an, rng)
    skeleton.render_sternum(hu, g, an)
    skeleton.render_scapulae(hu, g, an, rng)
    hi = skeleton.hila(an)
    if lobar:
        hi.update(hila_mod.vein_roots(an, hi))
    blood, air, eso = skeleton.mediastinal_tubes(an, rng, [hi["vein_r_inf"], hi["vein_l_inf"]] if lobar else ())
    for s in eso:
        paint(hu, g, s, 35.0)
    vessels.render_vessels(hu, g, blood, an.blood_hu)

    pts = cf.sample_points(rng, "lung", 2.0, np.inf, 5000)
    trees, airways = [], []
    for side, key in ((-1, "r"), (1, "l")):
        own = pts[np.sign(pts[:, 0] - an.cx) == side]
        k = len(own) // 3
        if lobar:
            trees += _lobar_trees(rng, an, hi, key, side, own[:k], own[k: 2 * k])
            air_pts = own[2 * k: 2 * k + 32]
            airways += hila_mod.lobar_tree(rng, hi[f"bronchus_{key}"], 4.5, air_pts,
                                           hila_mod.lobe_of(an, air_pts, side), side, min_radius=0.8)
        else:
            trees += vessels.grow_tree(rng, hi[f"artery_{key}"], 7.0, own[:k])
            trees += vessels.grow_tree(rng, hi[f"vein_{key}"], 6.5, own[k: 2 * k])
            airways += vessels.grow_tree(rng, hi[f"bronchus_{key}"], 4.5, own[2 * k: 2 * k + 24], min_radius=0.8)
    lung_blood = an.blood_hu * 0.6 + 20
    vessels.render_vessels(hu, g, trees, lung_blood)
    nodes = hila_mod.lymph_nodes(rng, trees, airways, an.blood_hu) if lobar else []
    for seg, value in nodes:
        paint(hu, g, seg, value, mode="max")
    vessels.render_airways(hu, g, air + airways)

    labels = np.zeros(g.shape, np.uint16)
    z_range = (fine.origin[2], fine.origin[2] + (n - 1) * sz)
    specs, tiny = nod.sample_specs(rng)
    found, excluded, taken = [], [], []
    for d, kind, attached in specs:
        c = nod.place(rng, d, attached, cf, trees, z_range, taken)
        if c is None:
            continue
        irc = nod.render(hu, labels, lung, g, c, d, kind, rng, len(found) + 1)
        if irc is None:
            continue
        taken.append((c, d / 2))
        found.append(nod.Nodule(tuple(float(v) for v in _world(g, irc)), round(d, 2), kind, attached))
    for d, kind, attached in tiny:
        c = nod.place(rng, d, attached, cf, trees, z_range, taken)
        if c is not None:
            nod.render(hu, labels, lung, g, c, d, kind, rng, 0)
            taken.append((c, d / 2))
            excluded.append(nod.Nodule(tuple(float(v) for v in c), round(d, 2), kind, attached))

    negatives = _negatives(rng, cf, fine, trees, airways, ribs, found, excluded,
                           hilar=[n.p0 / 2 + n.p1 / 2 for n, _ in nodes] if lobar else None)
    if sub > 1:
        hu, labels = thick_slices(hu, labels, sub)
    blur_and_noise(hu, acq, rng)
    arr, origin, direction = flip_geometry(to_int16(hu), fine.origin, fine.spacing, fine.shape, flip_axis)
    labels, _, _ = flip_geometry(labels, fine.origin, fine.spacing, fine.shape, flip_axis)
    uid = series_uid(seed, index)
    ct = CTVolume(arr, origin, fine.spacing, direction, seriesuid=uid, source=f"synth:{seed}:{index}")
    meta = {"index": index, "seriesuid": uid, "shape_zyx": list(arr.shape), "spacing_xyz": list(fine.spacing),
            "origin_xyz": list(origin), "flip": flip_axis, "noise_sd": round(acq.noise_sd, 2),
            "psf_sigma_px": round(acq.psf_sigma_px, 3), "contrast": bool(an.blood_hu > 100),
            "slice_samples": sub, "nodules": len(found), "excluded": len(excluded), "negatives": len(negatives)}
    return SyntheticScan(ct, labels, found, excluded, negatives, meta)


def slice_samples(spacing_z: float) -> int:
    """Sub-slices drawn per reconstructed slice: none below :data:`SUB_SLICE_MM`, else enough to
    keep them at most that far apart."""
    return max(1, int(np.ceil(spacing_z / SUB_SLICE_MM - 1e-6)))


def thick_slices(hu: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each run of ``k`` sub-slices averaged into one slice; a voxel keeps a nodule's label when
    at least half of its sub-slices hold it (the mask a reader would draw on the thick slice)."""
    n = hu.shape[0] // k
    hu = hu.reshape(n, k, *hu.shape[1:]).mean(axis=1, dtype=np.float32)
    sub = labels.reshape(n, k, *labels.shape[1:])
    keep = 2 * np.count_nonzero(sub, axis=1) >= k
    return hu, np.where(keep, sub.max(axis=1), 0).astype(labels.dtype)


def _world(grid: Grid, irc) -> np.ndarray:
    return np.asarray(grid.origin) + np.asarray(grid.spacing) * np.asarray(irc)[::-1]


def _lobar_trees(rng, an, hi: dict, key: str, side: int, arterial: np.ndarray, venous: np.ndarray) -> list:
    """One lung's arteries (lobar trunks from one hilum) and veins (the superior veins drain the
    upper and middle lobes, the inferior ones the lower lobe)."""
    trees = hila_mod.lobar_tree(rng, hi[f"artery_{key}"], 7.0, arterial, hila_mod.lobe_of(an, arterial, side), side)
    lobes = hila_mod.lobe_of(an, venous, side)
    low = lobes == hila_mod.LOWER
    for root, part in ((hi[f"vein_{key}"], ~low), (hi[f"vein_{key}_inf"], low)):
        if part.any():
            r = 6.5 * (part.mean()) ** (1 / 3)
            trees += hila_mod.lobar_tree(rng, root, r, venous[part], lobes[part], side)
    return trees


def _negatives(rng, cf, fine: Grid, trees, airways, ribs, found, excluded, hilar=None) -> list[tuple]:
    """Class-0 candidates at things that look like nodules: vessels, forks, pleura, ribs, airway
    walls, and with ``hilar`` (lymph-node centres) the nodes and the lobar trunks around them."""
    lo = np.asarray(fine.origin)
    hi = lo + np.asarray(fine.spacing) * (np.array(fine.shape[::-1]) - 1)
    zr = (lo[2], hi[2])
    lung_trees = [s for s in trees if s.depth > 0]
    forks = vessels.bifurcations(lung_trees)
    groups = [
        vessels.points_on(lung_trees, rng, 420, (0.6, 4.5)),
        forks[rng.permutation(len(forks))[:200]],
        cf.sample_points(rng, "lung", 0.5, 4.0, 120, zr),
        cf.sample_points(rng, "lung", 5.0, np.inf, 100, zr),
    ]
    rib_pts = [pts[-1] for pts, _ in ribs] + [pts[rng.integers(2, len(pts) - 2)] for pts, _ in ribs]
    groups.append(np.array(rib_pts))
    aw = vessels.points_on(airways, rng, 40, (0.8, 6.0))
    if len(aw):
        aw = aw + rng.normal(size=aw.shape) * 1.5
        groups.append(aw)
    groups.append(np.array([e.center_xyz for e in excluded]).reshape(-1, 3))
    if hilar is not None:
        groups.append(np.array(hilar).reshape(-1, 3))
        groups.append(vessels.points_on([s for s in trees if s.depth <= 2], rng, 60, (2.0, 8.0)))
    pts = np.concatenate([g.reshape(-1, 3) for g in groups])
    ok = np.all((pts >= lo + 2) & (pts <= hi - 2), axis=1)
    for f in found:
        ok &= np.linalg.norm(pts - np.asarray(f.center_xyz), axis=1) > f.diameter_mm / 2 + 3
    return [tuple(round(float(v), 3) for v in p) for p in pts[ok]]
