"""Lobar branching at the hila and hilar lymph nodes.

A real hilum is where a lung's vessels and bronchi fan out into its lobes: within 2-3 cm of the
mediastinum the pulmonary artery has split into lobar trunks, the superior and inferior pulmonary
veins enter the left atrium apart, the bronchi divide beside the arteries, and lymph nodes sit in the
forks. Seen on an axial slice, that is a crowd of 3-10 mm tubes cut in every orientation with round
soft-tissue nodes between them: the look-alikes a nodule detector must learn to reject. A single
trunk per tree that splits only after several centimetres (the ``simple`` hila) shows none of it.
"""

from __future__ import annotations

import numpy as np

from nodulekit.data.synth.anatomy import Anatomy
from nodulekit.data.synth.tubes import Segment
from nodulekit.data.synth.vessels import grow_tree

HILA = ("simple", "lobar")
UPPER, MIDDLE, LOWER = 0, 1, 2
# the order in which a lung's lobar trunks leave its hilum: the first group splits off at the hilum,
# the rest continues as one trunk (the right interlobar artery, the bronchus intermedius) and splits again
SPLITS = {-1: ((UPPER,), (MIDDLE, LOWER)), 1: ((UPPER,), (LOWER,))}


def lobe_of(an: Anatomy, xyz: np.ndarray, side: int) -> np.ndarray:
    """Lobe (UPPER, MIDDLE, LOWER) of lung points (N, 3) of one side (-1 right, +1 left).

    The oblique fissure climbs from the anterior diaphragm to the back of the upper chest; on the
    right, the horizontal fissure cuts the middle lobe off the upper lobe's anterior half.
    """
    h = xyz[:, 2] - an.z0
    y_rel = np.clip((xyz[:, 1] - an.yc) / np.where(xyz[:, 1] < an.yc, an.Ba, an.Bp), -1, 1)
    oblique = an.H * (0.42 + 0.25 * y_rel)
    lobe = np.where(h < oblique, LOWER, UPPER)
    if side < 0:
        lobe[(lobe == UPPER) & (h < 0.56 * an.H)] = MIDDLE
    return lobe


def lobar_tree(rng: np.random.Generator, root: np.ndarray, radius: float, territory: np.ndarray,
               lobes: np.ndarray, side: int, *, min_radius: float = 0.45) -> list[Segment]:
    """A tree from ``root`` that splits into lobar trunks 1-2.5 cm from it, each then growing over
    its own lobe's points (Murray's law for every trunk's radius)."""
    segs: list[Segment] = []
    groups = [g for g in SPLITS[side] if np.isin(lobes, g).any()]
    _split(rng, np.asarray(root, float), float(radius), territory, lobes, groups, segs, min_radius, 0)
    return segs


def _split(rng, p0, r, pts, lobes, groups, segs, min_radius, depth):
    n = len(pts)
    for group in groups:
        own = np.isin(lobes, group)
        if not own.any():
            continue
        share = own.sum() / n
        r1 = r * share ** (1 / 3)
        target = pts[own].mean(axis=0)
        v = target - p0
        length = rng.uniform(10, 25)
        p1 = p0 + v / max(float(np.linalg.norm(v)), 1e-6) * length + rng.normal(0, 2.0, 3)
        segs.append(Segment(p0, p1, r1, r1 * 0.96, depth))
        if len(group) > 1:  # a trunk that carries several lobes: split it by lobe at its end
            _split(rng, p1, r1 * 0.96, pts[own], lobes[own], [(g,) for g in group], segs, min_radius, depth + 1)
        else:
            segs += grow_tree(rng, p1, r1 * 0.96, pts[own], min_radius=min_radius, depth0=depth + 1)


def vein_roots(an: Anatomy, hila: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inferior pulmonary veins' entries, below and behind the superior ones (``vein_r``/``vein_l``)."""
    out = {}
    for key in ("r", "l"):
        sup = hila[f"vein_{key}"]
        out[f"vein_{key}_inf"] = sup + np.array([0.0, 0.12 * an.Bp, -0.1 * an.H])
    return out


def lymph_nodes(rng: np.random.Generator, trees: list[Segment], airways: list[Segment],
                blood_hu: float) -> list[tuple[Segment, float]]:
    """Hilar lymph nodes: ovoid soft tissue of 4-12 mm against the roots of the lobar trunks, where
    they leave the mediastinum. Returns (capsule, HU) pairs; nodes barely enhance with contrast.

    Only the trunks' first half holds them: a node out in the aerated lung, beside a segmental
    vessel, is what a juxtavascular nodule looks like, and labelling it a non-nodule would teach
    the models to miss those.
    """
    hub = [s for s in airways + trees if s.depth == 0 and max(s.r0, s.r1) >= 2.0]
    if not hub:
        return []
    hu = rng.uniform(25, 55) + (0.12 * (blood_hu - 40) if blood_hu > 100 else 0.0)
    nodes = []
    for _ in range(int(rng.integers(2, 9))):
        s = hub[int(rng.integers(len(hub)))]
        axis = s.p1 - s.p0
        axis = axis / max(float(np.linalg.norm(axis)), 1e-6)
        off = rng.normal(size=3)
        off -= (off @ axis) * axis
        off /= max(float(np.linalg.norm(off)), 1e-6)
        long = rng.uniform(4, 12) / 2
        short = long * rng.uniform(0.55, 0.9)
        c = s.p0 + rng.uniform(0.0, 0.5) * (s.p1 - s.p0) + off * (max(s.r0, s.r1) + 0.6 * short)
        u = rng.normal(size=3)
        u /= max(float(np.linalg.norm(u)), 1e-6)
        half = long - short
        nodes.append((Segment(c - u * half, c + u * half, short, short, 0), float(hu + rng.normal(0, 5))))
    return nodes
