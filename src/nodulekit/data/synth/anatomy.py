"""The chest as smooth signed fields: body wall, thorax, lungs, heart, diaphragm.

Every soft-tissue compartment is a field in mm (positive inside) computed on a coarse grid around
the patient and interpolated trilinearly to the scan's voxels, so boundaries are smooth, cheap and
identical wherever they are looked up (rendering, placing vessels and nodules, picking candidates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from nodulekit.data.synth.scanner import AIR_HU, Grid

FIELDS = ("body", "muscle", "thorax", "lung", "abdomen", "heart", "texture")


@dataclass
class Anatomy:
    """Patient shape parameters (world mm). ``h`` is height above the lowest lung point (world z = z0 + h)."""

    cx: float
    yc: float
    z0: float
    H: float  # lung height
    A: float  # ribcage half-width
    Ba: float  # ribcage anterior half-depth
    Bp: float  # ribcage posterior half-depth
    wall: float  # lateral body-wall thickness
    fat: float  # subcutaneous fat thickness scale
    rib_fourier: np.ndarray  # (K, 4): k, amplitude, phase, z-frequency
    body_fourier: np.ndarray
    med: np.ndarray  # (2, 6) mediastinal half-width control points (right, left) over y_rel
    dome: tuple[float, float]  # right, left diaphragm dome heights
    heart: np.ndarray  # centre (x, y, h) and half axes
    lung_hu: float
    lung_grad: float  # dependent-lung density increase, HU
    blood_hu: float
    spine_r: float

    @property
    def spine_y(self) -> float:
        return self.yc + self.Bp - 1.25 * self.spine_r

    @property
    def body_width(self) -> float:
        return 2 * (self.A + self.wall) + 8


MED_Y = np.array([-1.0, -0.55, -0.1, 0.3, 0.7, 1.05])


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient (position in the image is set later by :func:`place`)."""
    A = rng.uniform(112, 148)
    Ba = A * rng.uniform(0.62, 0.75)
    H = rng.uniform(195, 255)

    def fourier(amp):
        ks = np.arange(2, 5)
        return np.stack([ks, amp * rng.uniform(0.4, 1.0, 3) / ks**0.7, rng.uniform(0, 2 * np.pi, 3),
                         rng.normal(0, 0.012, 3)], axis=1)

    spine_r = rng.uniform(15, 20)
    med = np.array([[5, 10, 20, 20, spine_r + 6, spine_r + 2],
                    [5, 12, 24, 26, spine_r + 18, spine_r + 4]], float)
    med += rng.normal(0, 2.0, med.shape)
    domes = (rng.uniform(45, 75), rng.uniform(35, 60))
    heart = np.array([rng.uniform(0.18, 0.28) * A, -0.3 * Ba, domes[1] + rng.uniform(15, 35),
                      rng.uniform(0.36, 0.44) * A, rng.uniform(0.5, 0.6) * Ba, rng.uniform(0.2, 0.26) * H])
    contrast = rng.uniform() < 0.3
    return Anatomy(
        cx=0.0, yc=0.0, z0=0.0, H=H, A=A, Ba=Ba, Bp=Ba * rng.uniform(1.05, 1.2),
        wall=rng.uniform(10, 30), fat=rng.uniform(0.3, 0.8),
        rib_fourier=fourier(0.045), body_fourier=fourier(0.03), med=med, dome=domes, heart=heart,
        lung_hu=rng.uniform(-895, -855), lung_grad=rng.uniform(10, 45),
        blood_hu=rng.uniform(140, 260) if contrast else rng.uniform(30, 50), spine_r=spine_r,
    )


def _fourier(f: np.ndarray, theta, h):
    out = 0.0
    for k, a, ph, w in f:
        out = out + a * np.cos(k * theta + ph + w * h)
    return out


def _lung_side(an: Anatomy, x, y, h, side: int, g_rib):
    """Signed field of one lung (side -1 right = -x, +1 left)."""
    y_rel = np.clip((y - an.yc) / np.where(y < an.yc, an.Ba, an.Bp), -1.05, 1.05)
    m = np.interp(y_rel, MED_Y, an.med[0 if side < 0 else 1])
    upper = np.clip((h - 0.62 * an.H) / (0.2 * an.H), 0, 1)
    m = m + upper * (8 if side > 0 else 4) * (np.abs(y_rel) < 0.5)
    g_med = side * (x - an.cx) - m
    d = an.dome[0 if side < 0 else 1]
    q = ((x - an.cx - side * 0.45 * an.A) / (0.55 * an.A)) ** 2 + ((y - an.yc + 0.25 * an.Ba) / (0.8 * an.Ba)) ** 2
    g_dome = h - d * np.exp(-q)
    qa = ((x - an.cx - side * 0.5 * an.A) / (0.4 * an.A)) ** 2 + ((y - an.yc - 0.15 * an.Bp) / (0.6 * an.Bp)) ** 2
    g_apex = an.H - 40 * np.tanh(qa) - h
    return np.minimum(np.minimum(g_rib - 3.0, g_med), np.minimum(g_dome, g_apex)), g_apex


def thorax_axes(an: Anatomy, h, posterior):
    """Half-axes (lateral, antero-posterior) of the ribcage contour at height ``h``; narrower at the apex."""
    shrink = np.sqrt(1 - np.clip((h - 0.45 * an.H) / (0.55 * an.H + 45), 0, 0.95) ** 2)
    return an.A * shrink, np.where(posterior, an.Bp, an.Ba) * (0.4 + 0.6 * shrink)


def thorax_contour(an: Anatomy, alpha, h, offset: float = 0.0) -> np.ndarray:
    """World (x, y) on the ribcage contour at contour angle ``alpha`` (0 = patient left, pi/2 = back)."""
    a, b = thorax_axes(an, h, np.sin(alpha) > 0)
    r = 1 + _fourier(an.rib_fourier, alpha, h) + offset / np.sqrt(a * b)
    return np.stack([an.cx + a * r * np.cos(alpha), an.yc + b * r * np.sin(alpha)], axis=-1)


def fields(an: Anatomy, x, y, h) -> dict[str, np.ndarray]:
    """Signed fields (mm, positive inside) at broadcastable world x, y and height h."""
    a, b = thorax_axes(an, h, y >= an.yc)
    dx, dy = (x - an.cx), (y - an.yc)
    theta = np.arctan2(dy / b, dx / a)
    rho = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    g_rib = (1 + _fourier(an.rib_fourier, theta, h) - rho) * np.sqrt(a * b)

    ab = an.A + an.wall
    bb = np.where(y < an.yc, an.Ba + 0.7 * an.wall, an.Bp + 0.9 * an.wall + 28)
    thb = np.arctan2(dy / bb, dx / ab)
    rb = (np.abs(dx / ab) ** 2.4 + np.abs(dy / bb) ** 2.4) ** (1 / 2.4)
    g_body = (1 + _fourier(an.body_fourier, thb, h) - rb) * np.sqrt(ab * bb)
    fat_t = an.wall * an.fat * (0.8 + 0.5 * np.cos(thb + 2.0) ** 2) + 2
    g_muscle = g_body - fat_t

    (g_right, apex_r), (g_left, apex_l) = _lung_side(an, x, y, h, -1, g_rib), _lung_side(an, x, y, h, 1, g_rib)
    g_lung = np.maximum(g_right, g_left)
    g_rib = np.minimum(g_rib, np.maximum(apex_r, apex_l) + 4)
    hx, hy, hh, ha, hb, hc = an.heart
    qh = np.sqrt(((x - an.cx - hx) / ha) ** 2 + ((y - an.yc - hy) / hb) ** 2 + ((h - hh) / hc) ** 2)
    g_heart = (1 - qh) * min(ha, hb)
    g_lung = np.minimum(g_lung, -(g_heart + 5))
    qd = ((x - an.cx + 0.2 * an.A) / (0.9 * an.A)) ** 2 + ((y - an.yc + 0.2 * an.Ba) / an.Ba) ** 2
    g_abd = (an.dome[0] + 8) * np.exp(-qd) + 4 - h
    return {"body": g_body, "muscle": g_muscle, "thorax": g_rib, "lung": g_lung, "abdomen": g_abd, "heart": g_heart}


class CoarseFields:
    """All fields sampled on a coarse grid over the whole chest, with trilinear lookups."""

    def __init__(self, an: Anatomy, grid: Grid, rng: np.random.Generator):
        self.grid = grid
        x, y, z = grid.axis(0)[None, None, :], grid.axis(1)[None, :, None], grid.axis(2)[:, None, None]
        f = fields(an, x, y, z - an.z0)
        shape = grid.shape
        tex = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.6)
        tex *= np.float32(1.0 / max(tex.std(), 1e-6))
        f["texture"] = tex
        self.data = np.stack([np.broadcast_to(f[k], shape).astype(np.float32) for k in FIELDS])

    def at_points(self, name: str, xyz: np.ndarray) -> np.ndarray:
        """Field values at world points (N, 3), trilinear (the same values the rendered volume uses)."""
        g = self.grid
        xyz = np.atleast_2d(xyz)
        coords = [(xyz[:, k] - g.origin[k]) / g.spacing[k] for k in (2, 1, 0)]
        return ndi.map_coordinates(self.data[FIELDS.index(name)], coords, order=1, mode="nearest")

    def sample_points(self, rng, name: str, lo: float, hi: float, n: int, z_range=None) -> np.ndarray:
        """Up to ``n`` random world points whose field lies in [lo, hi] (jittered within a coarse cell)."""
        g = self.grid
        v = self.data[FIELDS.index(name)]
        ok = (v >= lo) & (v <= hi)
        if z_range is not None:
            z = g.axis(2)
            ok &= ((z >= z_range[0]) & (z <= z_range[1]))[:, None, None]
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return np.zeros((0, 3))
        pick = rng.choice(idx, size=min(n, idx.size), replace=False)
        iz, iy, ix = np.unravel_index(pick, v.shape)
        xyz = np.stack([g.origin[0] + g.spacing[0] * ix, g.origin[1] + g.spacing[1] * iy,
                        g.origin[2] + g.spacing[2] * iz], axis=1)
        xyz += rng.uniform(-0.3, 0.3, xyz.shape) * np.asarray(g.spacing)
        keep = (self.at_points(name, xyz) >= lo) & (self.at_points(name, xyz) <= hi)
        return xyz[keep]

    def interpolate(self, fine: Grid, zs: slice, rows: slice, cols: slice) -> np.ndarray:
        """Fields on the fine grid over ``[zs, rows, cols]``: array (len(FIELDS), nz, ny, nx)."""
        out = self.data
        # z, then x on the coarse rows, then y last: the big final pass gathers whole rows
        for k, axis, sl in ((2, 1, zs), (0, 3, cols), (1, 2, rows)):
            coord = fine.axis(k)[sl]
            u = np.clip((coord - self.grid.origin[k]) / self.grid.spacing[k], 0, out.shape[axis] - 1.0001)
            i0 = np.floor(u).astype(np.intp)
            shape = [1] * 4
            shape[axis] = -1
            w = (u - i0).astype(np.float32).reshape(shape)
            a = np.take(out, i0, axis=axis)
            b = np.take(out, i0 + 1, axis=axis)
            b -= a
            b *= w
            a += b
            out = a
        return out

    def body_box(self, fine: Grid) -> tuple[slice, slice]:
        """Fine-grid rows and columns that can hold any body voxel."""
        inside = (self.data[FIELDS.index("body")] > -2 * self.grid.spacing[0]).any(axis=0)
        out = []
        for k, ax in ((1, 1), (0, 0)):
            idx = np.flatnonzero(inside.any(axis=ax))
            if idx.size == 0:
                return slice(0, 0), slice(0, 0)
            lo = self.grid.origin[k] + self.grid.spacing[k] * (idx[0] - 1)
            hi = self.grid.origin[k] + self.grid.spacing[k] * (idx[-1] + 1)
            n = fine.shape[2 - k]
            i0 = int(np.clip(np.floor((lo - fine.origin[k]) / fine.spacing[k]), 0, n))
            i1 = int(np.clip(np.ceil((hi - fine.origin[k]) / fine.spacing[k]) + 1, i0, n))
            out.append(slice(i0, i1))
        return out[0], out[1]


def _frac(g: np.ndarray, width: float, out=None) -> np.ndarray:
    """Partial-volume fraction of a signed field (in place when ``out`` is ``g``)."""
    r = np.multiply(g, np.float32(1.0 / width), out=out)
    r += np.float32(0.5)
    return np.clip(r, 0, 1, out=r)


def compose(an: Anatomy, cf: CoarseFields, fine: Grid, table2d: np.ndarray, chunk: int = 12):
    """Render the soft-tissue chest on the fine grid. Returns (hu float32, lung mask bool)."""
    nz = fine.shape[0]
    hu = np.empty(fine.shape, np.float32)
    hu[:] = table2d
    lung = np.zeros(fine.shape, bool)
    rows, cols = cf.body_box(fine)
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return hu, lung
    w = fine.spacing[0]
    ys = fine.axis(1)[rows][None, :, None]
    grad = (an.lung_grad * 0.5 * (np.clip((ys - an.yc) / an.Bp, -1, 1) + 1) + an.lung_hu).astype(np.float32)
    heart_hu = np.float32(an.blood_hu * 0.25 + 30)
    table = table2d[rows, cols]
    for z0 in range(0, nz, chunk):
        zs = slice(z0, min(nz, z0 + chunk))
        body, muscle, thorax, lf, abd, heart, tex = cf.interpolate(fine, zs, rows, cols)
        lung[zs, rows, cols] = lf > 0
        skin = _frac(body - np.float32(2.0), w)
        wall = _frac(muscle, 2 * w, out=muscle)
        wall *= np.float32(145)
        wall += np.float32(-100)
        wall += np.float32(10) * tex
        wall -= np.float32(25)
        wall *= skin
        wall += np.float32(25)
        inner = np.float32(15) * tex
        inner += np.float32(-90)
        inner += (np.float32(55) - inner) * _frac(abd, 2 * w, out=abd)
        inner += (heart_hu - inner) * _frac(heart, 2 * w, out=heart)
        tex *= np.float32(18)
        tex += grad
        tex -= inner
        tex *= _frac(lf, w, out=lf)
        inner += tex
        inner -= wall
        inner *= _frac(thorax, w, out=thorax)
        inner += wall
        inner -= table
        inner *= _frac(body, w, out=body)
        inner += table
        hu[zs, rows, cols] = inner
    return hu, lung


def table_slice(an: Anatomy, fine: Grid, rng) -> np.ndarray:
    """2-D background: air plus a curved scanner table under the patient (z-invariant)."""
    x, y = fine.axis(0)[None, :], fine.axis(1)[:, None]
    bg = np.full((fine.shape[1], fine.shape[2]), AIR_HU, np.float32)
    if rng.uniform() < 0.25:
        return bg
    top = an.yc + an.Bp + 0.9 * an.wall + 30 + rng.uniform(0, 6)
    curve = top + 0.0016 * (x - an.cx) ** 2
    for off, thick, val in ((0, 2.0, -200.0), (9, 1.5, 150.0), (30, 3.0, -400.0)):
        d = np.abs(y - curve - off)
        bg = np.maximum(bg, AIR_HU + (val - AIR_HU) * np.clip(thick / 2 - d + 0.5, 0, 1))
    return bg
