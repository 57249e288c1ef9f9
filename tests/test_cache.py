"""VolumeCache: decode once, memmap afterwards, crops, and workers racing on one volume."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from nodulekit.data.cache import VolumeCache
from nodulekit.data.crops import crop_hu
from nodulekit.data.ct import write_ct
from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError


def make_scan(folder, uid="1.2.3", shape=(10, 24, 28), seed=0):
    hu = np.random.default_rng(seed).integers(-1000, 500, size=shape).astype(np.int16)
    ct = CTVolume(hu, (-5.0, 3.0, 100.0), (0.7, 0.7, 2.0), np.diag([-1.0, -1.0, 1.0]))
    return write_ct(ct, folder / "subset0" / f"{uid}.mhd", compress=True), hu


def test_get_decodes_once(tmp_path, monkeypatch):
    path, hu = make_scan(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    first = cache.get(path)
    assert isinstance(first.hu, np.memmap) and not first.hu.flags.writeable
    np.testing.assert_array_equal(first.hu, hu)
    assert first.seriesuid == "1.2.3" and first.hu.dtype == np.int16
    np.testing.assert_allclose(first.direction, np.diag([-1.0, -1.0, 1.0]))

    import nodulekit.data.cache as cache_mod

    def fail(*a, **k):
        raise AssertionError("decoded twice")

    monkeypatch.setattr(cache_mod, "read_ct", fail)
    second = VolumeCache(tmp_path / "cache").get(path)
    np.testing.assert_array_equal(second.hu, hu)
    assert second.origin == first.origin and second.spacing == first.spacing


def test_key_follows_source_changes(tmp_path):
    path, _ = make_scan(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    before = cache.key(path)
    _, hu = make_scan(tmp_path, seed=1)
    os.utime(path.with_suffix(".zraw"), ns=(1, 1))
    assert cache.key(path) != before
    np.testing.assert_array_equal(cache.get(path).hu, hu)


def test_get_by_uid_and_errors(tmp_path):
    path, hu = make_scan(tmp_path)
    cache = VolumeCache(tmp_path / "cache", data_dir=tmp_path)
    np.testing.assert_array_equal(cache.get("1.2.3").hu, hu)
    with pytest.raises(InputError, match="9.9.9: no such file, nor a seriesuid"):
        cache.get("9.9.9")
    with pytest.raises(InputError, match="need at least 20"):
        cache.get(path, min_slices=20)


def test_crop_hu_padding():
    hu = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    inside = crop_hu(hu, (2, 2, 3), (2, 3, 4))
    np.testing.assert_array_equal(inside, hu[1:3, 1:4, 1:5])
    edge = crop_hu(hu, (0, 0, 0), (2, 2, 2))
    assert edge[0, 0, 0] == -1000 and edge[1, 1, 1] == hu[0, 0, 0]
    assert (crop_hu(hu, (50, 0, 0), (2, 2, 2)) == -1000).all()
    assert crop_hu(hu, (1.6, 2.4, 3.0), (1, 1, 1))[0, 0, 0] == hu[2, 2, 3]


def test_crop_cached(tmp_path, monkeypatch):
    path, hu = make_scan(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    crop = cache.crop(path, (1.2, 20.0, 3.0), (4, 8, 8))
    np.testing.assert_array_equal(crop, crop_hu(hu, (1, 20, 3), (4, 8, 8)))
    assert crop.flags.writeable
    monkeypatch.setattr(VolumeCache, "get", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    np.testing.assert_array_equal(cache.crop(path, (1, 20, 3), (4, 8, 8)), crop)


def _worker(args):
    cache_dir, path = args
    vol = VolumeCache(cache_dir).get(path)
    return int(np.asarray(vol.hu, dtype=np.int64).sum()), vol.shape


def test_workers_race(tmp_path):
    path, hu = make_scan(tmp_path, shape=(40, 64, 64))
    cache_dir = tmp_path / "cache"
    ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
    with ctx.Pool(2) as pool:
        results = pool.map(_worker, [(cache_dir, path)] * 6, chunksize=1)
    assert set(results) == {(int(hu.astype(np.int64).sum()), hu.shape)}
    leftovers = [p.name for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert len(list(cache_dir.glob("*.npy"))) == 1 and len(list(cache_dir.glob("*.json"))) == 1


class _CropDataset:
    def __init__(self, cache_dir, path):
        self.cache_dir, self.path = cache_dir, path

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return VolumeCache(self.cache_dir).crop(self.path, (5, 10 + i, 10), (4, 6, 6))


def test_dataloader_workers(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    path, hu = make_scan(tmp_path)
    loader = DataLoader(_CropDataset(tmp_path / "cache", path), batch_size=2, num_workers=2)
    batches = torch.cat([torch.as_tensor(b) for b in loader])
    expected = np.stack([crop_hu(hu, (5, 10 + i, 10), (4, 6, 6)) for i in range(4)])
    np.testing.assert_array_equal(batches.numpy(), expected)


def test_cache_entries_are_written_whole_without_temporary_files(tmp_path):
    from nodulekit.data.cache import _save_npy

    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    target = _save_npy(tmp_path / "sub" / "a.npy", arr)
    np.testing.assert_array_equal(np.load(target), arr)
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.npy"]
