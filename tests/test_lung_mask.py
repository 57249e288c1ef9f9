"""The cheap lung mask on a phantom and on the real CPTAC scan."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.detect.lung_mask import lung_components, lung_mask, lung_volume_ml

SPACING = (3.0, 3.0, 5.0)  # x, y, z mm: a 96x96x24 phantom spans a chest


def _ellipsoid(shape, center_zyx, radii_mm, spacing_xyz):
    z, y, x = np.ogrid[tuple(slice(0, s) for s in shape)]
    sz, sy, sx = spacing_xyz[::-1]
    cz, cy, cx = center_zyx
    rz, ry, rx = radii_mm
    return ((z - cz) * sz / rz) ** 2 + ((y - cy) * sy / ry) ** 2 + ((x - cx) * sx / rx) ** 2 <= 1.0


def phantom(nodule_center=(12, 48, 28), nodule_mm=5.0):
    """Air around a soft-tissue body holding two lungs (-850 HU) and a solid nodule in the right lung."""
    shape = (24, 96, 96)
    hu = np.full(shape, -1000, dtype=np.int16)
    body = _ellipsoid(shape, (12, 48, 48), (200, 110, 135), SPACING)
    hu[body] = 40
    hu[:, 88:, :] = 100  # a couch touching the body
    for cx in (28, 68):
        hu[_ellipsoid(shape, (12, 48, cx), (50, 60, 40), SPACING)] = -850
    hu[_ellipsoid(shape, nodule_center, (nodule_mm,) * 3, SPACING)] = 30
    return hu


def test_phantom_two_lungs_without_outside_air():
    hu = phantom()
    m = lung_mask(hu, SPACING, dilate_mm=0)
    assert lung_components(m, 50, SPACING) == 2
    assert not m[:, :, :5].any() and not m[:, :3, :].any()  # outside air is not lung
    assert m[12, 48, 28]  # the nodule inside the lung is filled in
    truth = hu == -850
    assert 0.9 < lung_volume_ml(m, SPACING) / lung_volume_ml(truth | (hu == 30), SPACING) < 1.1


def test_dilation_keeps_juxtapleural_nodules():
    # nodule centred on the lateral wall of the right lung: half of it lies in the chest wall
    hu = phantom(nodule_center=(12, 48, 28 - 40 // 3), nodule_mm=4.0)
    tight = lung_mask(hu, SPACING, dilate_mm=0)
    loose = lung_mask(hu, SPACING)
    nodule = (hu == 30)
    assert not tight[nodule].all()
    assert loose[nodule].all()
    assert (loose >= tight).all()


def test_no_lung():
    hu = np.full((10, 64, 64), -1000, dtype=np.int16)
    assert not lung_mask(hu, SPACING).any()
    hu[:, 10:54, 10:54] = 50  # a block of tissue without air inside
    assert not lung_mask(hu, SPACING).any()


@pytest.mark.slow
def test_real_cptac_scan(cptac_mhd):
    from nodulekit.data.ct import read_ct

    ct = read_ct(cptac_mhd)
    m = lung_mask(ct.hu, ct.spacing, dilate_mm=0)
    volume = lung_volume_ml(m, ct.spacing)
    assert 2000 < volume < 8000
    # both lungs: substantial air on each side of the midline
    half = ct.shape[2] // 2
    assert lung_volume_ml(m[:, :, :half], ct.spacing) > 800
    assert lung_volume_ml(m[:, :, half:], ct.spacing) > 800
    # lung parenchyma dominates the mask
    assert np.median(ct.hu[m]) < -600
    dilated = lung_mask(ct.hu, ct.spacing)
    assert (dilated >= m).all() and lung_volume_ml(dilated, ct.spacing) < 1.5 * volume


@pytest.mark.parametrize("spacing", [(0.7, 0.68, 0.68), (2.5, 0.8, 0.6), (6.0, 1.1, 1.1)])
def test_dilation_is_the_cylinder_dilation(spacing):
    from scipy import ndimage

    from nodulekit.detect.lung_mask import _dilate

    rng = np.random.default_rng(0)
    mask = rng.random((20, 40, 50)) > 0.995
    mask[8:11, 10:20, 20:30] = True
    sz, sy, sx = spacing
    r = [int(np.floor(5.0 / s)) for s in spacing]
    rows, cols = np.ogrid[-r[1]: r[1] + 1, -r[2]: r[2] + 1]
    disk = (rows * sy) ** 2 + (cols * sx) ** 2 <= 25.0
    cylinder = np.repeat(disk[None], 2 * r[0] + 1, axis=0)  # a disk on every slice within 5 mm
    expected = ndimage.binary_dilation(mask, structure=cylinder)
    assert np.array_equal(_dilate(mask, 5.0, np.array(spacing)), expected)


def test_lung_masks_gives_both_masks_of_one_pass():
    from nodulekit.detect.lung_mask import lung_masks

    hu = phantom(nodule_center=(12, 48, 28 - 40 // 3), nodule_mm=4.0)
    aerated, dilated = lung_masks(hu, SPACING)
    np.testing.assert_array_equal(aerated, lung_mask(hu, SPACING, dilate_mm=0))
    np.testing.assert_array_equal(dilated, lung_mask(hu, SPACING))
    assert not aerated[hu == 30].all() and (dilated >= aerated).all()
