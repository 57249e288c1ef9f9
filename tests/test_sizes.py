"""One mark per nodule, at its size: the generator's nodules of every kind, size and attachment
through the candidate stage.

Each case is a small chest phantom (air, a chest wall, lung) with one nodule drawn by the
synthetic generator's own code (:func:`nodulekit.data.synth.nodules.render`: lobulated, solid,
part-solid or ground glass), free in the lung, on the pleura (its centre as close to the wall as
the generator puts it) or on a vessel (as the generator attaches it: its centre ``r + 0.4 r_v``
from the vessel's axis). The segmentation is the generator's ground-truth nodule mask plus the
vessel's voxels: a stand-in for a U-Net that finds the nodule, and marks the vessel with it as a
recall-trained one does, so that what is tested is what detection does after the network (the
lung mask, :func:`clean_mask`, :func:`find_candidates`, the size floor and the lung-contact check)
rather than a model's training. A HU threshold would not do: a ground-glass nodule (-650 to -420
HU) and its partial-volume rim are no denser than the lung's own edge voxels.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nodulekit.data.synth.nodules import KINDS, render
from nodulekit.data.synth.scanner import Grid
from nodulekit.data.synth.tubes import Segment, capsule_fraction, paint
from nodulekit.data.volume import CTVolume
from nodulekit.detect.candidates import MIN_DIAMETER_MM, borders_lung, clean_mask, find_candidates
from nodulekit.detect.lung_mask import lung_masks

DIAMETERS = (3.2, 5.0, 8.0, 13.0, 20.0, 30.0)
ATTACHED = ("none", "pleura", "vessel")
SPACINGS = ((0.7, 0.7, 1.25), (0.6, 0.6, 0.8), (0.8, 0.8, 2.0))
WALL_MM, AIR_MM = 8.0, 4.0
CASES = list(itertools.product(DIAMETERS, KINDS, ATTACHED))


def phantom(d: float, kind: str, attached: str, seed: int):
    """``(ct, segmentation stand-in, nodule centre xyz)`` of one case."""
    rng = np.random.default_rng(seed)
    spacing = SPACINGS[seed % len(SPACINGS)]
    r = d / 2
    lung_mm = max(40.0, 1.5 * d + 24)  # the lung's side: the nodule, its lobes, and a vessel around it
    side = lung_mm + 2 * (WALL_MM + AIR_MM)
    shape = tuple(int(np.ceil(side / s)) for s in spacing[::-1])
    grid = Grid(shape, (0.0, 0.0, 0.0), spacing)
    x, y, z = (grid.axis(k) for k in range(3))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij", sparse=True)
    lo = WALL_MM + AIR_MM  # where the lung begins on every side

    def inside(margin):
        return ((xx >= margin) & (xx <= side - margin) & (yy >= margin) & (yy <= side - margin)
                & (zz >= margin) & (zz <= side - margin))

    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[inside(AIR_MM)] = 40.0
    lung = np.broadcast_to(inside(lo), shape).copy()
    hu[lung] = -850.0
    center = np.full(3, side / 2) + rng.uniform(-1.0, 1.0, 3)
    if attached == "pleura":  # as the generator places it: 0.3 r to 0.6 r + 0.5 mm deep in the lung
        center[0] = lo + rng.uniform(0.3 * r, 0.6 * r + 0.5)
    vessel = np.zeros(shape, dtype=bool)
    if attached == "vessel":
        # the generator attaches nodules to vessels of 0.8-3.5 mm radius; one more than half as thick as
        # the nodule makes it a bulge on the vessel rather than a blob of its own
        r_v = float(rng.uniform(0.8, max(0.8, min(3.5, 0.5 * r))))
        axis = rng.normal(size=3) * (1.0, 1.0, 0.3)
        axis /= np.linalg.norm(axis)
        off = rng.normal(size=3)
        off -= (off @ axis) * axis
        off /= np.linalg.norm(off)
        through = center - off * (r + 0.4 * r_v)
        seg = Segment(through - axis * side, through + axis * side, r_v, r_v)
        paint(hu, grid, seg, 40.0)
        sl, frac = capsule_fraction(grid, seg)
        vessel[sl] = frac >= 0.5
        vessel &= lung
    labels = np.zeros(shape, dtype=np.uint16)
    assert render(hu, labels, lung, grid, center, d, kind, rng, 1) is not None
    ct = CTVolume(np.rint(hu).astype(np.int16), grid.origin, spacing, np.eye(3), f"case{seed}", "phantom")
    return ct, (labels > 0) | vessel, center


def candidates(ct, seg):
    """What detection keeps of a segmentation, as :func:`nodulekit.detect.detect_scan` does: a
    nodule on the pleura must also pass the lung-contact check, and a 3.2 mm one the size floor."""
    aerated, lung = lung_masks(ct.hu, ct.spacing, min_lung_ml=1.0)
    labels, n = clean_mask(seg, lung, ct.spacing)
    return [c for c in find_candidates(ct.hu, labels, n, ct)
            if c.diameter_mm >= MIN_DIAMETER_MM and borders_lung(c, aerated, ct.spacing)]


@pytest.mark.parametrize("d,kind,attached", CASES, ids=[f"{d:g}mm-{k}-{a}" for d, k, a in CASES])
def test_one_mark_per_nodule_at_its_size(d, kind, attached):
    ct, seg, center = phantom(d, kind, attached, CASES.index((d, kind, attached)))
    found = candidates(ct, seg)
    near = [f for f in found if np.linalg.norm(np.asarray(f.center_xyz) - center) <= d / 2]
    assert len(near) == 1, [(round(float(np.linalg.norm(np.asarray(f.center_xyz) - center)), 1),
                             round(f.diameter_mm, 1)) for f in found]
    (f,) = near
    # nodules.csv's diameter_mm is the volume-equivalent one
    assert abs(f.diameter_mm - d) <= max(0.2 * d, 1.5), (f.diameter_mm, f.long_axis_mm)
    # the longest axial diameter of a lobulated nodule: at least its volume's, at most the lobes' reach
    assert 0.8 * f.diameter_mm <= f.long_axis_mm <= 1.6 * d + 1.5, (f.diameter_mm, f.long_axis_mm)
    box, mask = f.region
    assert f.n_voxels == np.count_nonzero(mask) and f.volume_mm3 == pytest.approx(
        f.n_voxels * float(np.prod(ct.spacing)))
    row = f.to_dict()
    assert row["diameter_mm"] == row["volume_equivalent_diameter_mm"] and row["long_axis_mm"] > 0
