"""Rendering tubes (capsule chains) into a volume, each inside its own bounding box."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nodulekit.data.synth.scanner import Grid


@dataclass
class Segment:
    """A tapered capsule from ``p0`` to ``p1`` (world mm) with radii ``r0`` -> ``r1``."""

    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float
    depth: int = 0  # generation in its tree (0 = root)


def capsule_fraction(grid: Grid, seg: Segment, grow: float = 0.0):
    """Partial-volume fraction of a capsule (radius + ``grow``) inside its crop.

    Returns ``(slices, fraction)`` or ``None`` when the capsule misses the grid.
    """
    r = max(seg.r0, seg.r1) + grow
    pad = r + 1.5 * max(grid.spacing)
    lo = np.minimum(seg.p0, seg.p1) - pad
    hi = np.maximum(seg.p0, seg.p1) + pad
    box = grid.crop(lo, hi)
    if box is None:
        return None
    sl, (x, y, z) = box
    p0 = seg.p0.astype(np.float32)
    d = (seg.p1 - seg.p0).astype(np.float32)
    x, y, z = x - p0[0], y - p0[1], z - p0[2]
    l2 = float(d @ d)
    if l2 > 1e-9:
        t = np.clip((x * (d[0] / l2) + y * (d[1] / l2)) + z * (d[2] / l2), 0, 1)
    else:
        t = np.zeros((1, 1, 1), np.float32)
    dist = np.sqrt((x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2)
    rad = seg.r0 + grow + t * np.float32(seg.r1 - seg.r0)
    # partial-volume ramp one in-plane voxel wide; the slice profile comes from the scanner blur
    frac = np.clip((rad - dist) * np.float32(1.0 / grid.spacing[0]) + np.float32(0.5), 0, 1)
    return sl, frac


def paint(hu: np.ndarray, grid: Grid, seg: Segment, value, grow: float = 0.0, mode: str = "lerp") -> None:
    """Blend ``value`` into ``hu`` over the capsule. ``mode='max'`` never lowers a voxel."""
    res = capsule_fraction(grid, seg, grow)
    if res is None:
        return
    sl, f = res
    view = hu[sl]
    new = view + f * (np.float32(value) - view)
    if mode == "max":
        np.maximum(view, new, out=view)
    else:
        view[...] = new


def chain(points: np.ndarray, radii) -> list[Segment]:
    """Capsules joining consecutive points (N, 3) with per-point radii."""
    radii = np.broadcast_to(np.asarray(radii, float), (len(points),))
    return [Segment(points[i], points[i + 1], float(radii[i]), float(radii[i + 1])) for i in range(len(points) - 1)]
