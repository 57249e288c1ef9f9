"""Classifier crops: native voxels (dlwpt) and resampled to a fixed voxel size."""

import numpy as np
import pytest

from nodulekit.data.crops import cls_crop, crop_hu, parse_crop_spacing, resampled_crop


def _ball(shape, spacing_irc, center_irc, radius_mm, hu=100.0):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center_irc, spacing_irc))
    return np.where(d2 <= radius_mm ** 2, hu, -800.0).astype(np.float32)


def test_native_crop_pads_with_air_at_the_border():
    hu = np.full((10, 20, 20), 500, dtype=np.int16)
    c = cls_crop(hu, (1, 1, 1), (0, 0, 0), (32, 48, 48))
    assert c.shape == (32, 48, 48) and c.dtype == np.float32
    assert c[0, 0, 0] == -1000 and c[16, 24, 24] == 500
    assert (c == 500).sum() == 10 * 20 * 20  # the whole volume fits in the crop's lower corner
    assert cls_crop(hu, (1, 1, 1), (100, 100, 100), (32, 48, 48)).max() == -1000


def test_native_crop_clips_hu():
    hu = np.full((8, 8, 8), 3000, dtype=np.int16)
    assert cls_crop(hu, (1, 1, 1), (4, 4, 4), (4, 4, 4)).max() == 1000


def test_resampling_at_the_scan_spacing_is_the_native_crop():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, (30, 40, 40)).astype(np.float32)
    spacing_xyz = (0.7, 0.7, 2.0)
    native = crop_hu(hu, (12, 20, 17), (8, 12, 12))
    same = cls_crop(hu, spacing_xyz, (12, 20, 17), (8, 12, 12), crop_spacing=(2.0, 0.7, 0.7))
    np.testing.assert_allclose(same, native, atol=1e-3)


def test_resampled_crops_show_a_nodule_at_the_same_size_whatever_the_slice_spacing():
    """A 10 mm ball on 0.625 mm and 2.5 mm slices: native crops differ 4x in height, resampled
    ones hold the same number of voxels (within partial-volume error) and centre it at shape // 2."""
    counts = []
    for sz in (0.625, 2.5):
        spacing_irc = (sz, 0.7, 0.7)
        shape = (int(60 / sz), 80, 80)
        center = (shape[0] / 2 - 0.3, 40.2, 39.6)
        hu = _ball(shape, spacing_irc, center, 5.0)
        crop = cls_crop(hu, spacing_irc[::-1], center, (32, 48, 48), crop_spacing=(1.25, 0.8, 0.8))
        inside = crop > -350
        counts.append(int(inside.sum()))
        com = np.argwhere(inside).mean(axis=0)
        np.testing.assert_allclose(com, (16, 24, 24), atol=0.7)
    expected = 4 / 3 * np.pi * 5.0 ** 3 / (1.25 * 0.8 * 0.8)  # voxels of a 10 mm ball
    for n in counts:
        assert abs(n - expected) / expected < 0.2
    assert abs(counts[0] - counts[1]) / expected < 0.2


def _map_coordinates_crop(hu, spacing_irc, center_irc, shape, crop_spacing):
    """The same crop by ``scipy.ndimage.map_coordinates``: eight weights per output voxel."""
    from scipy import ndimage

    shape = np.asarray(shape, dtype=int)
    step = np.asarray(crop_spacing, dtype=np.float64) / np.asarray(spacing_irc, dtype=np.float64)
    first = np.asarray(center_irc, dtype=np.float64) - (shape // 2) * step
    lo = np.floor(first).astype(int) - 1
    box_shape = np.ceil(first + (shape - 1) * step).astype(int) + 2 - lo
    box = crop_hu(hu, lo + box_shape // 2, box_shape).astype(np.float32)
    axes = [first[k] - lo[k] + step[k] * np.arange(shape[k]) for k in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    out = ndimage.map_coordinates(box, coords, order=1, mode="nearest").reshape(tuple(shape))
    return np.clip(out, -1000, 1000)


@pytest.mark.parametrize("center", [(30.3, 60.7, 64.1), (1.2, 3.3, 125.9), (58.9, 118.0, 2.0), (-40, 5, 5)])
def test_resampled_crops_equal_map_coordinates(center):
    """Training's and detection's crops (axis by axis) against ``map_coordinates``' trilinear ones,
    inside the volume, across its edges and outside it, to float32 rounding of HU."""
    from nodulekit.detect.crops import cls_crops

    hu = np.random.default_rng(0).integers(-1100, 1500, (60, 120, 130)).astype(np.int16)
    spacing_xyz = (0.56, 0.56, 1.0)
    want = _map_coordinates_crop(hu, spacing_xyz[::-1], center, (32, 48, 48), (1.25, 0.8, 0.8))
    got = resampled_crop(hu, spacing_xyz[::-1], center, (32, 48, 48), (1.25, 0.8, 0.8))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-2)
    batch = cls_crops(hu, spacing_xyz, [center, center], (32, 48, 48), (1.25, 0.8, 0.8))
    assert batch.shape == (2, 1, 32, 48, 48)
    np.testing.assert_array_equal(batch[1, 0], got)


def test_resampled_crop_outside_the_volume_is_air():
    hu = np.full((10, 20, 20), 300, dtype=np.int16)
    crop = resampled_crop(hu, (1.0, 1.0, 1.0), (5, 10, 10), (16, 16, 16), (2.0, 2.0, 2.0))
    assert crop[8, 8, 8] == 300 and crop[0, 0, 0] == -1000
    assert resampled_crop(hu, (1.0, 1.0, 1.0), (500, 10, 10), (4, 4, 4), (1.0, 1.0, 1.0)).max() == -1000


@pytest.mark.parametrize("text, expected", [
    ("native", None), ("", None), (None, None), ("1.25,0.8,0.8", (1.25, 0.8, 0.8)), ("1", (1.0, 1.0, 1.0))])
def test_parse_crop_spacing(text, expected):
    assert parse_crop_spacing(text) == expected


@pytest.mark.parametrize("text", ["1,2", "a,b,c", "0,1,1", "-1,1,1"])
def test_parse_crop_spacing_rejects(text):
    with pytest.raises(ValueError, match="crop spacing"):
        parse_crop_spacing(text)


def test_a_context_channel_is_the_same_candidate_over_a_wider_field_of_view():
    from nodulekit.data.crops import channel_spacings, cls_input
    from nodulekit.detect.crops import cls_crops

    spacing_irc = (1.0, 0.7, 0.7)
    hu = _ball((120, 200, 200), spacing_irc, (60, 100, 100), 5.0)
    x = cls_input(hu, spacing_irc[::-1], (60, 100, 100), (16, 32, 32), (1.25, 0.8, 0.8), context=2.5)
    assert x.shape == (2, 16, 32, 32) and x.dtype == np.float32
    assert np.array_equal(x[0], cls_crop(hu, spacing_irc[::-1], (60, 100, 100), (16, 32, 32), (1.25, 0.8, 0.8)))
    assert np.array_equal(x[1], cls_crop(hu, spacing_irc[::-1], (60, 100, 100), (16, 32, 32), (3.125, 2.0, 2.0)))
    # the 10 mm ball spans 12.5 columns at 0.8 mm and 5 at 2 mm: the wider channel shows more around it
    assert abs((x[0][8, 16] > 0).sum() - 12.5) <= 1 and abs((x[1][8, 16] > 0).sum() - 5) <= 1
    batch = cls_crops(hu, spacing_irc[::-1], [(60, 100, 100), (50, 90, 90)], (16, 32, 32), (1.25, 0.8, 0.8), 2.5)
    assert batch.shape == (2, 2, 16, 32, 32) and np.array_equal(batch[0], x)
    assert channel_spacings((1.25, 0.8, 0.8)) == [(1.25, 0.8, 0.8)] and channel_spacings(None) == [None]


@pytest.mark.parametrize("spacing, context", [
    (None, 2.0), ((1.25, 0.8, 0.8), 1.0), ((1.25, 0.8, 0.8), 0.5), ((1.25, 0.8, 0.8), float("nan")),
    ((1.25, 0.8, 0.8), 20.0), ((1.25, 0.8, 0.8), True)])
def test_a_context_needs_resampled_crops_and_a_factor_above_one(spacing, context):
    from nodulekit.data.crops import channel_spacings

    with pytest.raises(ValueError, match="context"):
        channel_spacings(spacing, context)
