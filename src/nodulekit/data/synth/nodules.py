"""Lung nodules: what they look like, where they sit, and their exact label masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from nodulekit.data.synth.anatomy import CoarseFields
from nodulekit.data.synth.scanner import Grid
from nodulekit.data.synth.tubes import Segment

KINDS = ("solid", "part_solid", "ground_glass")
ATTACHED = ("none", "pleura", "vessel")


@dataclass
class Nodule:
    """One finding. ``center_xyz`` is world mm and always falls inside the finding's label voxels."""

    center_xyz: tuple[float, float, float]
    diameter_mm: float
    kind: str
    attached: str


def sample_specs(rng: np.random.Generator) -> tuple[list[tuple], list[tuple]]:
    """Nodules to place (diameter, kind, attached), then tiny findings below 3 mm."""
    n = int(rng.choice([1, 1, 2, 2, 3, 3, 4, 5, 6]))
    specs = []
    for _ in range(n):
        d, kind = draw_nodule(rng)
        attached = str(rng.choice(ATTACHED, p=[0.5, 0.25, 0.25]))
        specs.append((d, kind, attached))
    tiny = [(float(rng.uniform(1.5, 2.9)), "solid", "none") for _ in range(int(rng.integers(0, 4)))]
    return specs, tiny


def draw_nodule(rng: np.random.Generator) -> tuple[float, str]:
    """Diameter (mm, 3.2-30: most near 6 mm, one in eight 10-30 mm) and kind of one nodule."""
    if rng.uniform() < 0.12:
        d = rng.uniform(10, 30)
    else:
        d = float(np.exp(rng.normal(np.log(6.2), 0.35)))
    d = float(np.clip(d, 3.2, 30))
    return d, str(rng.choice(KINDS, p=[0.72, 0.1, 0.18]))


def place(rng, d: float, attached: str, cf: CoarseFields, vessels: list[Segment], z_range, taken) -> np.ndarray | None:
    """A centre (world mm) for a nodule of diameter ``d``, away from the ``taken`` (centre, radius) pairs."""
    r = d / 2
    zr = (z_range[0] + r + 1, z_range[1] - r - 1)
    if zr[1] <= zr[0]:
        return None
    cand = []
    if attached == "vessel":
        pool = [s for s in vessels if 0.8 <= s.r0 <= 3.5 and zr[0] < s.p0[2] < zr[1]]
        for i in rng.integers(0, len(pool), 40) if pool else []:
            s = pool[i]
            axis = (s.p1 - s.p0) / max(np.linalg.norm(s.p1 - s.p0), 1e-6)
            off = rng.normal(size=3)
            off -= (off @ axis) * axis
            off /= max(np.linalg.norm(off), 1e-6)
            cand.append(s.p0 + rng.uniform(0.2, 0.8) * (s.p1 - s.p0) + off * (r + 0.4 * s.r0))
        cand = np.array(cand).reshape(-1, 3)
        if len(cand):
            cand = cand[cf.at_points("lung", cand) > 0.8 * r + 1]
    elif attached == "pleura":
        cand = cf.sample_points(rng, "lung", 0.3 * r, 0.6 * r + 0.5, 60, zr)
    if len(cand) == 0:
        cand = cf.sample_points(rng, "lung", r + 2, np.inf, 60, zr)
    for c in cand:
        if zr[0] <= c[2] <= zr[1] and all(np.linalg.norm(c - t) > r + tr + 4 for t, tr in taken):
            return c
    return None


def _shape_radius(rng, r: float, ux, uy, uz, lobulation: float):
    out = np.float32(1.0)
    for _ in range(4):
        n = rng.normal(size=3)
        n /= np.linalg.norm(n)
        out = out + np.float32(rng.uniform(0, lobulation)) * np.cos(
            rng.uniform(2, 5) * (ux * n[0] + uy * n[1] + uz * n[2]) + rng.uniform(0, 2 * np.pi))
    return r * out


def _ball(rng, pixel_mm: float, center, r, lob, sl_xyz):
    x, y, z = sl_xyz
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    d = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-6)
    rad = _shape_radius(rng, r, dx / d, dy / d, dz / d, lob)
    return np.clip((rad - d) * np.float32(1.0 / pixel_mm) + np.float32(0.5), 0, 1)


def nodule_field(rng, xyz, pixel_mm: float, center, d: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A nodule on a voxel grid, before the scanner's blur and noise.

    Args:
        xyz: world (x, y, z) mm of the voxels, broadcastable as (z, y, x) arrays.
        pixel_mm: in-plane voxel size, the width of the partial-volume edge.
        center, d, kind: world (x, y, z) mm of its centre, diameter in mm, one of :data:`KINDS`.

    Returns:
        ``(f, val)``: the share of each voxel the nodule fills (0-1) and its HU there.
    """
    r = d / 2
    lob = 0.07 if r < 4 else 0.12
    f = _ball(rng, pixel_mm, center, r, lob, xyz)
    if kind == "ground_glass":
        val = rng.uniform(-650, -420) + _texture(rng, f.shape, 35.0, pixel_mm)
    else:
        val = rng.uniform(20, 70) + _texture(rng, f.shape, 10.0, pixel_mm)
        if kind == "part_solid":
            core = _ball(rng, pixel_mm, center + rng.normal(0, 0.15 * r, 3), r * rng.uniform(0.3, 0.6), lob, xyz)
            val = (rng.uniform(-620, -420) + _texture(rng, f.shape, 35.0, pixel_mm)) * (1 - core) + val * core
    return f, val


def render(hu, labels, lung, grid: Grid, center, d: float, kind: str, rng, label: int) -> np.ndarray | None:
    """Draw one nodule and write ``label`` into ``labels`` where it dominates.

    Returns the (index, row, col) of the label voxel nearest the label's centroid, or ``None`` when
    no voxel is labelled.
    """
    r = d / 2
    box = grid.crop(center - 1.4 * r - 2, center + 1.4 * r + 2)
    if box is None:
        return None
    sl, xyz = box
    inside = lung[sl]
    f, val = nodule_field(rng, xyz, grid.spacing[0], center, d, kind)
    f = f * inside
    own = (f >= 0.5) & inside
    if label:
        if not own.any():
            return None
        labels[sl][own] = label
    view = hu[sl]
    np.maximum(view, view + f * (val - view), out=view)
    idx = np.argwhere(own)
    if len(idx) == 0:
        return None
    offs = np.array([s.start for s in sl])
    cen = np.rint(idx.mean(axis=0)).astype(int)
    if not own[tuple(cen)]:
        cen = idx[np.argmin(((idx - cen) ** 2).sum(axis=1))]
    return (cen + offs).astype(float)  # (index, row, col) on the canonical grid


def _texture(rng, shape, sd: float, pixel_mm: float) -> np.ndarray:
    t = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.2 / pixel_mm + 0.3)
    return t * np.float32(sd / max(float(t.std()), 1e-6))
