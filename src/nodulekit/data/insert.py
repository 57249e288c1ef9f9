"""Nodule insertion: synthetic nodules drawn into a scan's own tissue, as extra classifier positives.

A training set holds a few dozen nodules (LUNA16: about 1,200 over 888 scans; the demo: ~40), so
the classifier sees each small nodule on a vessel or against the pleura a handful of times and
learns them as exceptions. Inserting a nodule at a non-nodule candidate (a vessel, a fork, the
pleura, plain lung) gives a new positive in a real neighbourhood every time, a known augmentation
for lesion detection ("lesion insertion"). The nodule is the synthetic generator's
(:func:`nodulekit.data.synth.nodules.nodule_field`: lobulated, solid, part-solid or ground-glass,
textured), drawn the way a scanner would see it:

* only where the tissue is lung (smoothed HU below -400), so a nodule at the chest wall stays on
  the lung side of the pleura, and only where it is denser than what is there (vessels, walls and
  bone are kept);
* the added density is blurred in-plane by a reconstruction kernel's point spread (0.4-0.8 pixels),
  and added on top of the scan's own noise, which therefore runs through the nodule as through
  everything else.

Everything happens on the native voxels, before the crop is resampled, as for a real candidate.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from nodulekit.data.crops import channel_spacings, cls_input, crop_hu
from nodulekit.data.synth.nodules import draw_nodule, nodule_field

LUNG_HU = -400.0  # smoothed HU below which the tissue counts as lung
PSF_SIGMA_PX = (0.4, 0.8)  # in-plane point spread of the added density, native pixels


def insert_nodule(hu: np.ndarray, spacing_xyz, center_irc, diameter_mm: float, kind: str,
                  rng: np.random.Generator) -> bool:
    """Draw a nodule centred on ``center_irc`` into ``hu`` (float32, native voxels) in place.

    Args:
        hu: HU volume or box (index, row, col), float32.
        spacing_xyz: its voxel size (x, y, z) mm.
        center_irc: the nodule's centre in (continuous) voxels.
        diameter_mm, kind: as :func:`nodulekit.data.synth.nodules.draw_nodule` returns them.
        rng: source of its shape, texture and blur.

    Returns:
        ``False`` (``hu`` untouched) when the centre is not in lung.
    """
    sx, sy, sz = (float(v) for v in spacing_xyz)
    spacing_irc = np.array([sz, sy, sx])
    center = np.asarray(center_irc, dtype=np.float64)
    half = np.ceil((0.7 * diameter_mm + 3.0) / spacing_irc).astype(int)
    lo = np.maximum(np.floor(center).astype(int) - half, 0)
    hi = np.minimum(np.floor(center).astype(int) + half + 2, hu.shape)
    if np.any(hi <= lo):
        return False
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    view = hu[box]
    # the tissue without the scan's noise: 1 mm in-plane smoothing (noise is correlated over <1 mm)
    smooth = ndi.gaussian_filter(view, (0.0, 1.0 / sy, 1.0 / sx), truncate=2.5)
    lung = ndi.gaussian_filter(view, (0.7 / sz, 1.5 / sy, 1.5 / sx), truncate=2.5) < LUNG_HU
    c_local = center - lo
    if not lung[tuple(np.clip(np.rint(c_local).astype(int), 0, np.array(view.shape) - 1))]:
        return False
    z, y, x = (np.arange(n, dtype=np.float32) * s for n, s in zip(view.shape, spacing_irc))
    xyz = (x[None, None, :], y[None, :, None], z[:, None, None])
    f, val = nodule_field(rng, xyz, sx, c_local[::-1] * spacing_irc[::-1], diameter_mm, kind)
    added = (f * lung * np.maximum(val - smooth, 0.0)).astype(np.float32)
    sigma = rng.uniform(*PSF_SIGMA_PX)
    ndi.gaussian_filter(added, (0.0, sigma, sigma), output=added, truncate=2.5)
    view += added
    return True


def inserted_crop(hu: np.ndarray, spacing_xyz, center_irc, shape, crop_spacing, rng: np.random.Generator,
                  offset_radii: float = 0.0, context: float | None = None) -> np.ndarray | None:
    """A classifier input ``(C, *shape)`` (see :func:`nodulekit.data.crops.cls_input`) of a nodule
    inserted near ``center_irc``.

    The nodule's diameter and kind come from :func:`~nodulekit.data.synth.nodules.draw_nodule`; its
    centre lies up to ``offset_radii`` of its radii away from ``center_irc`` in a random direction
    (so that a vessel at the candidate runs past it, not always through its middle), and the crop is
    centred on the nodule. Returns ``None`` when that centre is not in lung.
    """
    d, kind = draw_nodule(rng)
    sx, sy, sz = (float(v) for v in spacing_xyz)
    spacing_irc = np.array([sz, sy, sx])
    u = rng.normal(size=3)
    u /= max(float(np.linalg.norm(u)), 1e-6)
    center = np.asarray(center_irc, dtype=np.float64) + u * rng.uniform(0, offset_radii) * d / 2 / spacing_irc
    shape = np.asarray(shape, dtype=int)
    widest = channel_spacings(crop_spacing, context)[-1]
    step = np.ones(3) if widest is None else np.asarray(widest, dtype=np.float64) / spacing_irc
    # a native box around the widest channel's extent, with room for the resampling and the nodule's blur
    box_shape = np.ceil(shape * step).astype(int) + 6
    origin = np.rint(center).astype(int) - box_shape // 2
    box = crop_hu(np.asarray(hu), origin + box_shape // 2, box_shape).astype(np.float32)
    local = center - origin
    if not insert_nodule(box, spacing_xyz, local, d, kind, rng):
        return None
    return cls_input(box, spacing_xyz, local, shape, crop_spacing, context)
