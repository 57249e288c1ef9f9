"""Nodule labels: grown from annotations (dlwpt-code's rule) or read from an exact mask file."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.data.ct import write_ct
from nodulekit.data.luna import Annotation
from nodulekit.data.masks import grown_mask, nodule_labels
from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError

SPACING = (0.8, 0.8, 1.5)
ORIGIN = (-20.0, -30.0, -40.0)


def sphere_ct(centers_irc, radius_mm=4.0, shape=(30, 60, 60), uid="1.2.3") -> CTVolume:
    """Lung-like -850 HU background holding solid (+40 HU) spheres."""
    hu = np.full(shape, -850, dtype=np.int16)
    z, y, x = np.indices(shape)
    for c in centers_irc:
        d2 = ((z - c[0]) * SPACING[2]) ** 2 + ((y - c[1]) * SPACING[1]) ** 2 + ((x - c[2]) * SPACING[0]) ** 2
        hu[d2 <= radius_mm**2] = 40
    return CTVolume(hu, ORIGIN, SPACING, np.eye(3), seriesuid=uid)


def annotation(ct, irc, diameter=8.0) -> Annotation:
    return Annotation(ct.seriesuid, tuple(ct.voxel_to_world(irc)), diameter)


def test_grown_mask_is_the_sphere():
    ct = sphere_ct([(15, 30, 30)])
    mask = grown_mask(ct, annotation(ct, (15, 30, 30)))
    np.testing.assert_array_equal(mask, ct.hu > -700)


def test_grown_mask_off_centre_annotation():
    ct = sphere_ct([(15, 30, 30)])
    mask = grown_mask(ct, annotation(ct, (15.4, 31.2, 29.3)))
    assert mask.sum() > 0.8 * (ct.hu > -700).sum()
    assert not (mask & (ct.hu <= -700)).any()


def test_grown_mask_outside_volume_and_in_air():
    ct = sphere_ct([(15, 30, 30)])
    assert not grown_mask(ct, annotation(ct, (100, 30, 30))).any()
    assert not grown_mask(ct, annotation(ct, (5, 5, 5))).any()  # centre in -850 HU: nothing dense


def test_grown_mask_at_volume_edge():
    ct = sphere_ct([(0, 30, 30)])
    mask = grown_mask(ct, annotation(ct, (0, 30, 30)))
    assert mask[0].any() and not mask[-1].any()  # no wrap-around to the far end


def test_nodule_labels_grown_in_row_order():
    ct = sphere_ct([(8, 15, 15), (20, 45, 40)])
    anns = [annotation(ct, (20, 45, 40)), Annotation("other", (0, 0, 0), 5.0), annotation(ct, (8, 15, 15))]
    labels = nodule_labels(None, ct, anns)
    assert labels.dtype == np.uint16 and labels.shape == ct.shape
    assert labels[20, 45, 40] == 1 and labels[8, 15, 15] == 2
    assert set(np.unique(labels)) == {0, 1, 2}


def test_nodule_labels_prefers_exact_mask(tmp_path):
    ct = sphere_ct([(15, 30, 30)])
    exact = np.zeros(ct.shape, dtype=np.uint16)
    exact[14:17, 29:32, 29:32] = 1
    write_ct(CTVolume(exact, ct.origin, ct.spacing, ct.direction), tmp_path / "masks" / f"{ct.seriesuid}.mhd",
             compress=True, dtype=np.uint16)
    labels = nodule_labels(tmp_path, ct, [annotation(ct, (15, 30, 30))])
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, exact)
    # without the file the labels are grown
    other = sphere_ct([(15, 30, 30)], uid="4.5.6")
    assert nodule_labels(tmp_path, other, [annotation(other, (15, 30, 30))]).sum() == (other.hu > -700).sum()


def test_exact_mask_shape_mismatch(tmp_path):
    ct = sphere_ct([(15, 30, 30)])
    path = write_ct(CTVolume(np.zeros((3, 4, 5), np.uint16), ct.origin, ct.spacing),
                    tmp_path / "masks" / f"{ct.seriesuid}.mhd", dtype=np.uint16)
    with pytest.raises(InputError, match="differs from the scan") as err:
        nodule_labels(tmp_path, ct, [])
    assert str(path) in str(err.value)
