import numpy as np
import pytest
import torch

from nodulekit.data.augment import RandAffine
from nodulekit.data.seg_dataset import SegScan, SegTrainDataset, SegValDataset


def _scan(uid="u", n=12, size=64, seed=0):
    rng = np.random.default_rng(seed)
    hu = np.full((n, size, size), -1000, np.int16)
    hu[:, 8:-8, 8:-8] = 20  # chest wall
    hu[:, 12:-12, 12:-12] = -850  # lung
    hu += np.arange(n, dtype=np.int16)[:, None, None]  # tells slices apart
    lab = np.zeros(hu.shape, np.uint16)
    z, y, x = np.mgrid[:n, :size, :size]
    for k, (c, r) in enumerate([((5, 20, 20), 3.0), ((8, 44, 40), 2.0)], start=1):
        m = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
        hu[m] = 40
        lab[m] = k
    hu[:, 30, 30] = rng.integers(1500, 3000)  # bright outlier: clipping must catch it
    return SegScan.from_labels(uid, hu, lab, {1: 6.0, 2: 4.0})


@pytest.mark.parametrize("z, expected", [(0, [0, 0, 0, 0, 1, 2, 3]), (1, [0, 0, 0, 1, 2, 3, 4]),
                                         (6, [3, 4, 5, 6, 7, 8, 9]), (11, [8, 9, 10, 11, 11, 11, 11])])
def test_context_clamps_at_volume_ends_and_clips_hu(z, expected):
    scan = _scan()
    img = scan.context(z)
    assert img.shape == (7, 64, 64) and img.dtype == np.float32
    assert [int(round(v)) + 850 for v in img[:, 20, 40]] == expected  # lung pixel: -850 + z
    assert img.max() <= 1000 and img.min() >= -1000


def test_sparse_labels_and_voxels():
    scan = _scan()
    assert sorted(scan.label_slices) == sorted({int(z) for v in scan.voxels.values() for z in v[:, 0]})
    assert set(scan.voxels) == {1, 2}
    assert scan.labels(0).sum() == 0 and scan.labels(5)[20, 20] == 1
    assert scan.body_box == (8, 56, 8, 56)


def test_positive_crops_contain_the_nodule():
    ds = SegTrainDataset([_scan()], samples_per_epoch=64, crop=32, window=48, negative_share=0.0, seed=1)
    for i in range(len(ds)):
        img, lab = ds[i]
        assert img.shape == (7, 32, 32) and lab.shape == (1, 32, 32)
        assert lab.sum() > 0
        assert float(img[3][lab[0] > 0].mean()) == pytest.approx(40.0)


def test_negative_share_and_determinism():
    ds = SegTrainDataset([_scan()], samples_per_epoch=400, crop=16, window=24, negative_share=0.5, seed=3)
    pos = np.mean([bool(ds[i][1].sum()) for i in range(len(ds))])
    assert 0.4 < pos < 0.65  # a background crop rarely grazes a nodule
    ds.set_epoch(1)
    a = ds[7]
    again = SegTrainDataset([_scan()], samples_per_epoch=400, crop=16, window=24, negative_share=0.5, seed=3)
    again.set_epoch(1)
    assert torch.equal(a[0], again[7][0])
    again.set_epoch(2)
    assert not all(torch.equal(ds[i][0], again[i][0]) for i in range(8))


def test_background_crops_centre_on_the_listed_lookalikes():
    base = _scan()
    hu = np.array(base.hu)
    hu[3, 40, 20] = 900  # a bright "vessel seen end-on", listed as a non-nodule candidate
    outside = [(3.0, 40.0, 20.0), (50.0, 5.0, 5.0), (-1.0, 3.0, 3.0)]  # two fall outside the volume
    lab = np.zeros(hu.shape, np.uint16)
    for z, sl in base.label_slices.items():
        lab[z] = sl
    scan = SegScan.from_labels("u", hu, lab, base.diameters, np.array(outside))
    assert scan.lookalikes.tolist() == [[3, 40, 20]]
    ds = SegTrainDataset([scan], samples_per_epoch=40, crop=16, window=24, negative_share=1.0,
                         lookalike_share=1.0, seed=0)
    assert all(bool((ds[i][0][3] == 900).any()) for i in range(len(ds)))  # the centre slice holds it
    ds = SegTrainDataset([scan], samples_per_epoch=200, crop=16, window=24, negative_share=1.0,
                         lookalike_share=0.5, seed=0)
    share = np.mean([bool((ds[i][0][3] == 900).any()) for i in range(len(ds))])
    assert 0.4 < share < 0.7  # half centred on it, a few random body crops graze it
    # a scan without look-alikes falls back to random body crops
    plain = SegTrainDataset([base], samples_per_epoch=8, crop=16, window=24, negative_share=1.0, lookalike_share=1.0)
    assert all(ds_item[1].shape == (1, 16, 16) for ds_item in (plain[i] for i in range(len(plain))))
    with pytest.raises(ValueError, match="lookalike_share"):
        SegTrainDataset([scan], samples_per_epoch=8, lookalike_share=1.5)


def test_validation_slices():
    ds = SegValDataset([_scan("a"), _scan("b", n=20)], negative_slices=3)
    per_scan = [sum(1 for s, _ in ds.items if s == k) for k in (0, 1)]
    n_pos = len(_scan().label_slices)
    assert per_scan == [n_pos + 3, n_pos + 3]
    img, lab, s = ds[0]
    assert img.shape == (7, 64, 64) and lab.shape == (64, 64) and s == 0
    assert [(s, k) for s, k, _ in ds.nodules] == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_augment_keeps_image_and_label_aligned():
    # the image is the label painted in HU: after any warp, the label must still mark the bright pixels
    lab = torch.zeros(8, 1, 32, 32)
    lab[:, :, 10:20, 12:24] = 1
    img = (lab * 1000 - 1000).repeat(1, 7, 1, 1)
    g = torch.Generator().manual_seed(0)
    out_img, out_lab = RandAffine(noise_hu=0.0)(img, lab, generator=g)
    assert out_img.shape == img.shape and out_lab.shape == lab.shape
    inside = out_img[:, 3][out_lab[:, 0] > 0]
    outside = out_img[:, 3][out_lab[:, 0] == 0]
    # both go through one interpolation: label > 0.5 exactly where the image is above -500 HU
    assert inside.min() >= -500 and outside.max() <= -500
    assert not torch.equal(out_lab, lab)  # it did move things
    assert set(out_lab.unique().tolist()) <= {0.0, 1.0}


def test_augment_is_seedable_and_3d():
    x = torch.randn(4, 1, 16, 24, 24, generator=torch.Generator().manual_seed(0)) * 300
    a = RandAffine()(x, generator=torch.Generator().manual_seed(5))
    b = RandAffine()(x, generator=torch.Generator().manual_seed(5))
    # the same draws give the same warp; the CPU's matmul may split its sums differently from one
    # call to the next on a busy machine, so the pixels agree to rounding, not bit for bit
    assert a.shape == x.shape and torch.allclose(a, b, rtol=0, atol=1e-2)
    c = RandAffine()(x, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(a, c, rtol=0, atol=1.0)
    ident = RandAffine(flip=False, shift=0, scale=0, rotate_deg=0, noise_hu=0)(x.clamp(-1000, 1000))
    # interpolating at the pixel centres leaves float32 rounding of a few thousandths of a HU
    assert torch.allclose(ident, x.clamp(-1000, 1000), rtol=0, atol=1e-2)
    with pytest.raises(ValueError):
        RandAffine(shift=-1)


@pytest.mark.parametrize("flip_slices", [False, True])
def test_augment_mirrors_the_slices_only_when_asked(flip_slices):
    # every slice holds its own value, so a pure flip shows in the order of the slices
    x = torch.arange(6.0)[:, None, None].expand(6, 8, 8).repeat(32, 1, 1, 1, 1) * 100 - 300
    aug = RandAffine(flip=False, shift=0, scale=0, rotate_deg=0, noise_hu=0, flip_slices=flip_slices)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.allclose(o, torch.flip(i, dims=[1]), atol=1e-2) for o, i in zip(out, x)])
    kept = torch.tensor([torch.allclose(o, i, atol=1e-2) for o, i in zip(out, x)])
    assert bool((mirrored | kept).all())
    assert int(mirrored.sum()) in (range(5, 28) if flip_slices else [0])  # about half of 32 when asked
    # without it, a seeded run draws exactly the transforms it drew before the option
    theta = RandAffine().randomize(5, 3, torch.Generator().manual_seed(1))
    assert torch.equal(RandAffine(flip_slices=False).randomize(5, 3, torch.Generator().manual_seed(1)), theta)
    # 2D batches have no slice axis to mirror
    assert RandAffine(flip_slices=True).randomize(4, 2, torch.Generator().manual_seed(1)).shape == (4, 2, 3)


def test_augment_is_one_interpolation_per_batch(monkeypatch):
    # what keeps augmentation cheap: the whole batch (image and label) goes through a single
    # grid_sample call, whatever the batch size; speed itself is measured by benchmarks, not here
    import nodulekit.data.augment as augment

    calls = []
    real = augment.F.grid_sample

    def spy(inp, grid, **kw):
        calls.append(tuple(inp.shape))
        return real(inp, grid, **kw)

    monkeypatch.setattr(augment.F, "grid_sample", spy)
    for n in (1, 16):
        calls.clear()
        RandAffine()(torch.randn(n, 7, 32, 32) * 300, torch.zeros(n, 1, 32, 32))
        assert calls == [(n, 8, 32, 32)]


@pytest.mark.parametrize("spatial", [(12, 20), (6, 10, 14)])
def test_fast_affine_grid_matches_torch(spatial):
    from nodulekit.data.augment import affine_grid

    theta = RandAffine().randomize(5, len(spatial), torch.Generator().manual_seed(1))
    want = torch.nn.functional.affine_grid(theta, [5, 1, *spatial], align_corners=False)
    assert torch.allclose(affine_grid(theta, spatial), want, atol=1e-6)


def _tiny_luna(root):
    """One 24x64x64 scan with one nodule, 1 positive and 5 negative candidates."""
    from nodulekit.data.ct import write_ct
    from nodulekit.data.luna import Annotation, Candidate, write_annotations, write_candidates
    from nodulekit.data.volume import CTVolume

    hu = np.full((24, 64, 64), -800, np.int16)
    z, y, x = np.mgrid[:24, :64, :64]
    hu[(z - 12) ** 2 + (y - 30) ** 2 + (x - 34) ** 2 <= 9] = 60
    ct = CTVolume(hu, origin=(-10.0, -20.0, -30.0), spacing=(0.8, 0.8, 2.0), seriesuid="1.2.3")
    write_ct(ct, root / "subset0" / "1.2.3.mhd")
    center = tuple(ct.voxel_to_world((12, 30, 34)))
    write_annotations(root / "annotations.csv", [Annotation("1.2.3", center, 5.0)])
    negs = [tuple(ct.voxel_to_world((z, 10 + 8 * i, 50))) for i, z in enumerate([3, 6, 9, 15, 20])]
    write_candidates(root / "candidates.csv", [Candidate("1.2.3", center, True)]
                     + [Candidate("1.2.3", c, False) for c in negs])
    return root


def test_cls_crops_are_centred_and_balanced(tmp_path):
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.cls_dataset import ClsTrainDataset, ClsValDataset, load_cls_samples

    root = _tiny_luna(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    samples = load_cls_samples(root, cache=cache)
    assert len(samples) == 6 and sum(s.is_nodule for s in samples) == 1
    pos = next(s for s in samples if s.is_nodule)
    assert np.allclose(pos.center_irc, (12, 30, 34), atol=1e-6) and pos.diameter_mm == 5.0
    ds = ClsTrainDataset(samples, cache, samples_per_epoch=10, seed=0)
    labels = [ds[i][1] for i in range(10)]
    assert labels == [1, 0] * 5
    crop, _ = ds[0]
    assert crop.shape == (1, 32, 48, 48) and crop.dtype == torch.float32
    assert float(crop[0, 16, 24, 24]) == 60.0  # nodule at the centre
    assert float(crop.min()) >= -1000
    val = ClsValDataset(samples, cache, max_negatives=2)
    assert len(val) == 3 and [val[i][1] for i in range(3)] == [1, 0, 0]


class _Scorer(torch.nn.Module):
    """A stand-in classifier: its nodule probability is a fixed linear function of the crop."""

    def forward(self, x):
        x = x.flatten(1).double()
        s = 0.5 + torch.atan(x @ torch.linspace(-1, 1, x.shape[1], dtype=x.dtype) / 1e6) / torch.pi
        return None, torch.stack([1 - s, s], 1)


def test_hard_negative_mining_draws_the_highest_scoring_non_nodules(tmp_path):
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.cls_dataset import ClsTrainDataset, load_cls_samples
    from nodulekit.train.cls import mine_hard_negatives

    root = _tiny_luna(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    ds = ClsTrainDataset(load_cls_samples(root, cache=cache), cache, samples_per_epoch=40, seed=0)
    crops = [ds.crops(s) for s in ds.neg]
    scores = np.array([float(_Scorer()(c[None])[1][0, 1]) for c in crops])
    assert len(np.unique(scores)) == len(scores)  # the stand-in tells the negatives apart
    hard = mine_hard_negatives(_Scorer(), ds, pool=5, keep=2, seed=0, epoch=1)
    assert sorted(hard.tolist()) == sorted(np.argsort(-scores)[:2].tolist())
    key = lambda t: t.numpy().tobytes()  # noqa: E731
    assert len({key(ds[i][0]) for i in range(1, 40, 2)}) > 2  # uniform draws before mining
    ds.set_hard_negatives(hard, share=1.0)
    assert {key(ds[i][0]) for i in range(1, 40, 2)} == {key(crops[j]) for j in hard}
    assert [ds[i][1] for i in range(6)] == [1, 0] * 3
    with pytest.raises(ValueError, match="share"):
        ds.set_hard_negatives(hard, share=1.5)


def test_detector_negatives_drawn_from_the_picked_ones(tmp_path):
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.cls_dataset import ClsTrainDataset, load_cls_samples
    from nodulekit.train.cls import highest_scoring

    root = _tiny_luna(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    samples = load_cls_samples(root, cache=cache)
    negatives = [s for s in samples if not s.is_nodule]
    ds = ClsTrainDataset(samples, cache, samples_per_epoch=40, seed=0, detector_negatives=negatives)
    crops = [ds.crops(s) for s in ds.detector_neg]
    scores = np.array([float(_Scorer()(c[None])[1][0, 1]) for c in crops])
    picked = highest_scoring(_Scorer(), ds.detector_neg, ds.crops, keep=2)
    assert picked.tolist() == np.argsort(-scores)[:2].tolist()
    key = lambda t: t.numpy().tobytes()  # noqa: E731
    ds.set_detector_share(1.0)
    assert len({key(ds[i][0]) for i in range(1, 40, 2)}) > 2  # every detector negative drawn
    ds.set_detector_share(1.0, picked)
    assert {key(ds[i][0]) for i in range(1, 40, 2)} == {key(crops[j]) for j in picked}
    ds.set_detector_share(1.0, [])
    assert ds.detector_share == 0.0  # nothing picked: nothing drawn from them


def test_a_split_file_fixes_the_held_out_scans(synth_data, tmp_path):
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.cls_dataset import build_cls_datasets
    from nodulekit.data.luna import find_series
    from nodulekit.data.seg_dataset import build_seg_datasets
    from nodulekit.data.split import train_val_split, write_split

    uids = sorted(find_series(synth_data))
    split = write_split(tmp_path / "split.json", uids[:2], [uids[3], "1.2.not.in.the.folder"])
    cache = VolumeCache(tmp_path / "cache")
    train, val = build_seg_datasets(synth_data, split_file=split, samples_per_epoch=4, cache=cache, progress=False)
    assert [s.uid for s in train.scans] == uids[:2] and [s.uid for s in val.scans] == [uids[3]]
    train, val = build_cls_datasets(synth_data, split_file=split, samples_per_epoch=4, cache=cache)
    assert {s.seriesuid for s in train.pos + train.neg} == set(uids[:2])
    assert {s.seriesuid for s in val.samples} == {uids[3]}
    # without one, val_fraction picks them, as before
    _, val = build_seg_datasets(synth_data, samples_per_epoch=4, cache=cache, progress=False)
    assert [s.uid for s in val.scans] == train_val_split(uids)[1]


def test_augmentation_moves_a_context_channel_by_the_same_millimetres():
    """A context channel spans 2.5x the field of view: the same shift in mm is 2.5x fewer of its
    voxels, so a blob centred in both channels stays at one point of the body in both."""
    from nodulekit.data.augment import RandAffine

    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (16, 32, 32)],
                                      indexing="ij"))
    blob = torch.exp(-((grid - torch.tensor([7.5, 15.5, 15.5]).view(3, 1, 1, 1)) ** 2).sum(0) / 8.0)
    x = torch.stack([blob, blob])[None].repeat(4, 1, 1, 1, 1) * 1000 - 500
    aug = RandAffine(flip=False, shift=0.2, scale=0.0, rotate_deg=0.0, noise_hu=0.0)
    for fov, ratio in ((None, 1.0), ((1.0, 2.5), 2.5)):
        out = aug(x, generator=torch.Generator().manual_seed(3), channel_fov=fov) + 500
        moved = [(out[:, k:k + 1] * grid).flatten(2).sum(-1) / out[:, k:k + 1].flatten(2).sum(-1)
                 - torch.tensor([7.5, 15.5, 15.5]) for k in (0, 1)]
        assert moved[0].abs().max() > 1.0  # it did shift
        assert torch.allclose(moved[0], moved[1] * ratio, atol=0.15), (moved[0], moved[1])
    with pytest.raises(ValueError, match="channel_fov"):
        aug(x, channel_fov=(1.0,))
