"""Space-filling branching trees for the pulmonary arteries, veins and bronchi.

Each tree owns a cloud of points sampled inside its lung. A branch heads for the centre of its
points, then splits them in two along their longest axis; the children's radii follow Murray's law
(r^3 proportional to the share of the territory), so radii taper from the hilum to the pleura.
"""

from __future__ import annotations

import numpy as np

from nodulekit.data.synth.scanner import Grid
from nodulekit.data.synth.tubes import Segment, paint


def grow_tree(rng: np.random.Generator, root: np.ndarray, radius: float, territory: np.ndarray,
              min_radius: float = 0.45, max_depth: int = 40, depth0: int = 0) -> list[Segment]:
    """Grow one tree from ``root`` (world mm) with ``radius`` over ``territory`` points (N, 3);
    its first segment is generation ``depth0`` (a subtree of a larger tree)."""
    segs: list[Segment] = []
    stack = [(np.asarray(root, float), float(radius), territory, depth0)]
    max_depth += depth0
    while stack:
        p0, r, pts, depth = stack.pop()
        n = len(pts)
        if n == 0:
            continue
        if n <= 2 or r < min_radius * 1.4 or depth >= max_depth:
            for q in pts:
                segs.append(Segment(p0, q, r, max(r * 0.6, min_radius * 0.7), depth))
            continue
        c = pts.mean(axis=0)
        v = c - p0
        dist = float(np.linalg.norm(v))
        length = min(dist * rng.uniform(0.35, 0.6), 10 * r + 15)
        p1 = p0 + v / max(dist, 1e-6) * max(length, 1.0) + rng.normal(0, 0.08 * length, 3)
        r1 = r * 0.96
        segs.append(Segment(p0, p1, r, r1, depth))
        cov = np.cov((pts - c).T) if n > 3 else np.eye(3)
        axis = np.linalg.eigh(cov)[1][:, -1]
        proj = (pts - c) @ axis
        order = np.argsort(proj)
        cut = n // 2 + int(rng.integers(-n // 6, n // 6 + 1)) if n > 6 else n // 2
        cut = min(max(cut, 1), n - 1)
        for part in (pts[order[:cut]], pts[order[cut:]]):
            stack.append((p1, r1 * (len(part) / n) ** (1 / 3), part, depth + 1))
    return segs


def render_vessels(hu: np.ndarray, grid: Grid, segs: list[Segment], value: float) -> None:
    """Blood vessels: never lower a voxel (crossing vessels merge)."""
    for s in segs:
        paint(hu, grid, s, value, mode="max")


def render_airways(hu: np.ndarray, grid: Grid, segs: list[Segment], wall_hu: float = 30.0) -> None:
    """Air lumens with a wall about 1 mm thick (thicker for large bronchi)."""
    for s in segs:
        paint(hu, grid, s, wall_hu, grow=0.6 + 0.12 * max(s.r0, s.r1), mode="max")
    for s in segs:
        paint(hu, grid, s, -1000.0)


def bifurcations(segs: list[Segment]) -> np.ndarray:
    """End points of non-leaf segments (where the tree splits), (N, 3)."""
    starts = {tuple(np.round(s.p0, 3)) for s in segs}
    pts = [s.p1 for s in segs if tuple(np.round(s.p1, 3)) in starts]
    return np.array(pts).reshape(-1, 3)


def points_on(segs: list[Segment], rng: np.random.Generator, n: int, r_range=(0.8, 6.0)) -> np.ndarray:
    """``n`` random points on the centre lines of segments whose radius lies in ``r_range``."""
    pool = [s for s in segs if r_range[0] <= s.r0 <= r_range[1]]
    if not pool:
        return np.zeros((0, 3))
    pick = rng.integers(0, len(pool), n)
    t = rng.uniform(0.1, 0.9, (n, 1))
    p0 = np.array([pool[i].p0 for i in pick])
    p1 = np.array([pool[i].p1 for i in pick])
    return p0 + t * (p1 - p0)
