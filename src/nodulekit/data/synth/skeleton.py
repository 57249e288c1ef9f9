"""Bone and the large mediastinal tubes: spine, ribs, sternum, aorta, pulmonary trunk, trachea."""

from __future__ import annotations

import numpy as np

from nodulekit.data.synth.anatomy import Anatomy, thorax_axes, thorax_contour
from nodulekit.data.synth.scanner import Grid
from nodulekit.data.synth.tubes import Segment, chain, paint

CORTEX_HU = 700.0
MARROW_HU = 240.0
CARTILAGE_HU = 120.0


def _bone(hu, grid, segs, r_cortex=1.2):
    for s in segs:
        paint(hu, grid, s, CORTEX_HU, mode="max")
    for s in segs:
        paint(hu, grid, s, MARROW_HU, grow=-r_cortex)


def rib_paths(an: Anatomy, rng) -> list[tuple[np.ndarray, float]]:
    """Centre lines (N, 3) and radius of every rib: from the spine, around the wall, down to the front."""
    out = []
    gap = rng.uniform(21, 26)
    for side in (-1, 1):
        phase = rng.uniform(0, 4)
        for i in range(13):
            h_top = an.H + 25 - phase - i * gap
            if h_top < -70:
                break
            drop = rng.uniform(45, 75) + 2 * i
            phi = np.linspace(0, 1, 14)
            # contour angle: 0 = patient left, pi/2 = back; right ribs run from the back through pi
            ang = np.pi / 2 + 0.32 + phi * (np.pi * 0.95 - 0.2)
            if side > 0:
                ang = np.pi - ang
            h = h_top - drop * phi**1.3
            r = rng.uniform(3.6, 4.6) * (1 - 0.012 * i)
            xy = thorax_contour(an, ang, h, offset=r + 2.5)
            out.append((np.column_stack([xy, an.z0 + h]), r))
    return out


def render_ribs(hu, grid: Grid, paths) -> None:
    for pts, r in paths:
        n_bone = int(len(pts) * 0.78)
        _bone(hu, grid, chain(pts[: n_bone + 1], r))
        for s in chain(pts[n_bone:], r * 0.95):
            paint(hu, grid, s, CARTILAGE_HU, mode="max")


def render_scapulae(hu, grid: Grid, an: Anatomy, rng) -> None:
    """Shoulder blades: thin bone plates behind the upper ribs, narrowing downwards."""
    for side in (-1, 1):
        top = an.H + rng.uniform(10, 30)
        bottom = rng.uniform(0.35, 0.5) * an.H
        depth = min(14.0, 0.5 * an.wall + 6) + 5
        for a in np.linspace(0.0, 0.22, 24):
            ang = np.pi / 2 + 0.6 + a * np.pi
            ang = ang if side < 0 else np.pi - ang
            h = np.linspace(top, bottom + (top - bottom) * 0.6 * (a / 0.22) ** 2, 6)
            xy = thorax_contour(an, np.full(h.shape, ang), h, offset=depth)
            for seg in chain(np.column_stack([xy, an.z0 + h]), 2.2):
                paint(hu, grid, seg, 550.0, mode="max")


def _disc_frac2d(x, y, cx, cy, r, w):
    return np.clip((r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2)) / w + 0.5, 0, 1)


def _seg_frac2d(x, y, p0, p1, r, w):
    d = np.subtract(p1, p0)
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / (d @ d), 0, 1)
    dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2)
    return np.clip((r - dist) / w + 0.5, 0, 1)


def render_spine(hu, grid: Grid, an: Anatomy, rng) -> None:
    """Vertebral bodies with discs, the canal, laminae and spinous/transverse processes."""
    rv, cx, cy = an.spine_r, an.cx, an.spine_y
    box = grid.crop((cx - 60, cy - rv - 5, -1e9), (cx + 60, cy + rv + 60, 1e9))
    if box is None:
        return
    sl, (x, y, z) = box
    x, y = x[0], y[0]  # (1, nx) and (ny, 1)
    w = grid.spacing[0]
    period = rng.uniform(22, 27)
    ph = ((z[:, 0, 0] - an.z0 + rng.uniform(0, period)) % period) / period
    disc = (ph < 0.2)[:, None, None]
    post = (ph > 0.15) & (ph < 0.75)
    body = _disc_frac2d(x, y, cx, cy, rv, w)[None]
    marrow = _disc_frac2d(x, y, cx, cy, rv - 1.5, w)[None]
    canal_y = cy + rv + 8
    ring = np.maximum(_disc_frac2d(x, y, cx, canal_y, 12, w),
                      _seg_frac2d(x, y, (cx, canal_y + 5), (cx, canal_y + 26), 4.0, w))
    for s in (-1, 1):
        ring = np.maximum(ring, _seg_frac2d(x, y, (cx + s * 8, canal_y), (cx + s * 30, canal_y + 2), 4.5, w))
    canal = _disc_frac2d(x, y, cx, canal_y, 7.5, w)[None]
    v = hu[sl]
    v += body * (np.where(disc, 90.0, CORTEX_HU).astype(np.float32) - v)
    v += marrow * (~disc) * (MARROW_HU - v)
    v += ring[None] * post[:, None, None] * (500.0 - v)
    v += canal * (15.0 - v)


def render_sternum(hu, grid: Grid, an: Anatomy) -> None:
    h = np.linspace(0.3 * an.H, an.H + 20, 12)
    for dx in (-9.0, 0.0, 9.0):
        pts = []
        for hh in h:
            _, b = thorax_axes(an, hh, False)
            pts.append((an.cx + dx, an.yc - b - 9, an.z0 + hh))
        _bone(hu, grid, chain(np.array(pts), 5.0), r_cortex=1.0)


def hila(an: Anatomy) -> dict[str, np.ndarray]:
    """Where the pulmonary arteries, veins and main bronchi enter each lung (world mm)."""
    cx, yc, z0, H = an.cx, an.yc, an.z0, an.H
    mr, ml = an.med[0, 2], an.med[1, 2]
    return {
        "artery_r": np.array([cx - mr - 10, yc + 0.05 * an.Bp, z0 + 0.6 * H]),
        "artery_l": np.array([cx + ml + 10, yc + 0.08 * an.Bp, z0 + 0.63 * H]),
        "vein_r": np.array([cx - mr - 8, yc - 0.1 * an.Ba, z0 + 0.47 * H]),
        "vein_l": np.array([cx + ml + 8, yc - 0.05 * an.Ba, z0 + 0.5 * H]),
        "bronchus_r": np.array([cx - mr - 8, yc + 0.18 * an.Bp, z0 + 0.6 * H]),
        "bronchus_l": np.array([cx + ml + 8, yc + 0.2 * an.Bp, z0 + 0.6 * H]),
    }


def mediastinal_tubes(an: Anatomy, rng, veins=()) -> tuple[list[Segment], list[Segment], list[Segment]]:
    """(blood vessels, airways, esophagus) capsules of the mediastinum; ``veins``: more pulmonary
    vein entries (world mm) to join to the left atrium."""
    cx, yc, z0, H, Ba = an.cx, an.yc, an.z0, an.H, an.Ba
    hi = hila(an)
    top = z0 + H + 80
    sp = an.spine_y - an.spine_r
    ra = rng.uniform(11, 14)
    desc_x = cx + 0.6 * an.spine_r + ra - 2
    blood = chain(np.array([
        [cx + 0.08 * an.A, yc - 0.3 * Ba, z0 + 0.45 * H], [cx + 0.05 * an.A, yc - 0.32 * Ba, z0 + 0.72 * H],
        [cx + 0.1 * an.A, yc - 0.05 * Ba, z0 + 0.82 * H], [desc_x, sp + 0.3 * an.spine_r, z0 + 0.76 * H],
        [desc_x, sp + 0.5 * an.spine_r, z0 - 80]]), [ra + 2, ra + 2, ra, ra, ra - 1])
    pa_bif = np.array([cx + 8, yc - 0.12 * Ba, z0 + 0.62 * H])
    blood += chain(np.array([[cx + 0.15 * an.A, yc - 0.5 * Ba, z0 + 0.45 * H], pa_bif]), [13, 12])
    blood += chain(np.array([pa_bif, hi["artery_r"]]), [10, 8])
    blood += chain(np.array([pa_bif, hi["artery_l"]]), [10, 8])
    la = np.array([cx + 0.05 * an.A, yc + 0.05 * Ba, z0 + 0.45 * H])  # left atrium, behind the heart
    blood += chain(np.array([la, hi["vein_r"]]), [8, 7]) + chain(np.array([la, hi["vein_l"]]), [8, 7])
    for v in veins:
        blood += chain(np.array([la, v]), [7, 6])
    blood += chain(np.array([[cx - 0.16 * an.A, yc - 0.25 * Ba, z0 + 0.5 * H],
                             [cx - 0.15 * an.A, yc - 0.2 * Ba, top]]), 9)
    tr_y = sp - rng.uniform(18, 24)
    carina = np.array([cx, tr_y + 6, z0 + 0.68 * H])
    rt = rng.uniform(7.5, 9.5)
    air = chain(np.array([[cx, tr_y, top], carina]), rt)
    air += chain(np.array([carina, hi["bronchus_r"]]), [rt * 0.75, 6.5])
    air += chain(np.array([carina, hi["bronchus_l"]]), [rt * 0.7, 5.5])
    eso = chain(np.array([[cx + 4, sp - 6, top], [cx + 10, sp - 8, z0 - 20]]), 7)
    return blood, air, eso
