"""Nodule insertion: a nodule appears in lung, keeps the scan's noise, spares the chest wall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodulekit.data.insert import insert_nodule, inserted_crop

SPACING = (0.7, 0.7, 1.25)  # x, y, z mm
NOISE_SD = 30.0


def _chest(seed=0):
    """Lung (-850 HU) with the chest wall (+40 HU) at columns >= 60, plus white noise."""
    rng = np.random.default_rng(seed)
    hu = np.full((40, 96, 96), -850.0, np.float32)
    hu[:, :, 60:] = 40.0
    return hu + rng.normal(0, NOISE_SD, hu.shape).astype(np.float32)


def test_a_solid_nodule_appears_in_lung_and_keeps_the_noise():
    hu = _chest()
    before = hu.copy()
    assert insert_nodule(hu, SPACING, (20, 48, 30), 8.0, "solid", np.random.default_rng(1))
    diff = hu - before
    core = diff[19:22, 45:52, 27:34]  # within 2.5 mm of the centre: fully nodule
    assert 20 + 850 - 100 < float(core.mean()) < 70 + 850 + 100  # lung raised to solid tissue (20-70 HU)
    # the added density is smooth: the scan's own noise runs through the nodule unchanged
    assert float(np.std(hu[19:22, 45:52, 27:34])) > 0.6 * NOISE_SD
    assert float(np.abs(diff[:, :, :18]).max()) == 0.0  # far from it, nothing changes
    assert float(np.abs(diff[:, :, 60:]).max()) == 0.0  # nor in the chest wall beyond its reach


def test_a_nodule_at_the_pleura_stays_on_the_lung_side():
    hu = _chest()
    before = hu.copy()
    # centre 2 mm inside the lung, 10 mm across: half of the ball lies in the wall
    assert insert_nodule(hu, SPACING, (20, 48, 57), 10.0, "solid", np.random.default_rng(2))
    diff = hu - before
    assert float(diff[18:23, 44:53, 52:58].mean()) > 500  # the lung side is filled
    assert float(np.abs(diff[:, :, 64:]).max()) < 1.0  # the wall's own HU is kept (denser than lung)


def test_ground_glass_is_fainter_than_solid():
    rises = {}
    for kind in ("solid", "ground_glass"):
        hu = _chest()
        before = hu.copy()
        assert insert_nodule(hu, SPACING, (20, 48, 30), 9.0, kind, np.random.default_rng(3))
        rises[kind] = float((hu - before)[19:22, 46:51, 28:33].mean())
    assert 150 < rises["ground_glass"] < 500 < rises["solid"]


def test_no_nodule_outside_the_lung():
    hu = _chest()
    before = hu.copy()
    assert not insert_nodule(hu, SPACING, (20, 48, 80), 6.0, "solid", np.random.default_rng(4))
    assert np.array_equal(hu, before)


@pytest.mark.parametrize("crop_spacing, context", [(None, None), ((1.25, 0.8, 0.8), None), ((1.25, 0.8, 0.8), 2.5)])
def test_inserted_crop_is_centred_on_the_new_nodule(crop_spacing, context):
    hu = _chest().astype(np.int16)
    found = 0
    for seed in range(6):
        crop = inserted_crop(hu, SPACING, (20, 48, 30), (32, 48, 48), crop_spacing, np.random.default_rng(seed),
                             offset_radii=0.7, context=context)
        channels = 1 if context is None else 2
        assert crop is not None and crop.shape == (channels, 32, 48, 48) and crop.dtype == np.float32
        assert -1000 <= crop.min() and crop.max() <= 1000
        if context:  # the wider channel is the same scene, nodule included: both sample its centre
            assert crop[1][16, 24, 24] == pytest.approx(crop[0][16, 24, 24], abs=0.01)
        centre = crop[0, 15:18, 22:27, 22:27].mean()
        found += centre > -700  # denser than the lung (-850 HU) at the centre: ground glass is -650 to -420
    assert found == 6
    assert inserted_crop(hu, SPACING, (20, 48, 80), (32, 48, 48), crop_spacing, np.random.default_rng(0)) is None


def test_training_positives_mix_listed_and_inserted_nodules(tmp_path):
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.cls_dataset import ClsTrainDataset, load_cls_samples
    from test_datasets import _tiny_luna

    root = _tiny_luna(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    samples = load_cls_samples(root, cache=cache)
    plain = ClsTrainDataset(samples, cache, samples_per_epoch=40, seed=0)
    listed = plain[0][0]
    ds = ClsTrainDataset(samples, cache, samples_per_epoch=40, seed=0, insert_share=0.5)
    items = [ds[i] for i in range(0, 40, 2)]
    assert all(label == 1 for _, label in items)
    inserted = [crop for crop, _ in items if not torch.equal(crop, listed)]
    assert 4 <= len(inserted) <= 16  # about half of 20
    # denser than the lung (-800 HU) at the centre
    assert all(crop.shape == (1, 32, 48, 48) and float(crop[0, 15:18, 22:27, 22:27].mean()) > -700
               for crop in inserted)
    again = ClsTrainDataset(samples, cache, samples_per_epoch=40, seed=0, insert_share=0.5)
    assert all(torch.equal(again[i][0], ds[i][0]) for i in range(0, 12, 2))  # reproducible
    with pytest.raises(ValueError, match="share"):
        ClsTrainDataset(samples, cache, samples_per_epoch=8, insert_share=2.0)
