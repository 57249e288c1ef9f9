"""Classifier datasets: ``(C, 32, 48, 48)`` crops around candidates (C = 2 with a context channel,
see :func:`nodulekit.data.crops.cls_input`), balanced for training.

Candidates come from ``candidates.csv`` merged with ``annotations.csv``
(:func:`nodulekit.data.luna.merge_candidates`); crops are cut by the VolumeCache (cached on disk,
so later epochs read small ``.npy`` files instead of whole scans). Real nodules are a tiny share
of the candidates, so training draws positives and negatives 1:1, each sample from
``(seed, epoch, index)`` alone (reproducible with any number of workers or DDP ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nodulekit import CLS_CROP, HU_MAX, HU_MIN, VAL_FRACTION
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("data")

INSERT_OFFSET = 0.7  # an inserted nodule's centre lies up to this many radii from its candidate


@dataclass(frozen=True)
class ClsSample:
    """A candidate located in its scan: ``path`` of the scan, voxel centre (index, row, col)."""

    seriesuid: str
    path: str
    center_irc: tuple[float, float, float]
    is_nodule: bool
    diameter_mm: float = 0.0


class _Crops:
    def __init__(self, cache, crop=CLS_CROP, crop_spacing=None, context=None):
        from nodulekit.data.crops import channel_spacings

        self.cache, self.crop = cache, tuple(crop)
        self.crop_spacing = None if crop_spacing is None else tuple(float(v) for v in crop_spacing)
        self.context = None if context is None else float(context)
        self.spacings = channel_spacings(self.crop_spacing, self.context)

    def __call__(self, s: ClsSample) -> torch.Tensor:
        hu = np.stack([np.asarray(self.cache.crop(s.path, s.center_irc, self.crop, sp), dtype=np.float32)
                       for sp in self.spacings])
        return torch.from_numpy(np.clip(hu, HU_MIN, HU_MAX, out=hu))


class ClsTrainDataset(Dataset):
    """Balanced training crops: even indices are nodules, odd ones non-nodules.

    Items are ``(crop (C, 32, 48, 48) float32, label int64)``. Positives are few, so each epoch
    walks a fresh permutation of them (repeating as needed); negatives are drawn at random, a
    ``hard_share`` of them from the hard negatives set by :meth:`set_hard_negatives` (the ones the
    classifier currently scores highest, see :func:`nodulekit.train.cls.mine_hard_negatives`), and,
    once :meth:`set_detector_share` is called, a share from ``detector_negatives``: the detector's
    own false positives on the training scans (:func:`nodulekit.detect.mine.mine_candidates`), all
    of them or the ones it picks.

    Args:
        samples: training candidates (both classes needed).
        cache: a :class:`nodulekit.data.cache.VolumeCache`.
        samples_per_epoch: ``len(dataset)``.
        seed: base seed; call :meth:`set_epoch` before each epoch.
        crop, crop_spacing: crop size in voxels and mm per voxel (``None``: native voxels), see
            :mod:`nodulekit.data.crops`; ``context``: the context channel's field-of-view factor
            (``None``: one channel).
        detector_negatives: more non-nodules, kept apart from ``samples``.
        insert_share: share of the positives that are a synthetic nodule inserted at a random
            non-nodule candidate (:mod:`nodulekit.data.insert`) instead of a listed nodule.
    """

    def __init__(self, samples: Sequence[ClsSample], cache, samples_per_epoch: int, seed: int = 0,
                 crop=CLS_CROP, crop_spacing=None, detector_negatives: Sequence[ClsSample] = (),
                 insert_share: float = 0.0, context=None):
        if not 0.0 <= insert_share <= 1.0:
            raise ValueError(f"inserted-nodule share must be in [0, 1], got {insert_share}")
        self.pos = [s for s in samples if s.is_nodule]
        self.neg = [s for s in samples if not s.is_nodule]
        if not self.pos or not self.neg:
            raise ValueError(f"classifier training needs both classes: {len(self.pos)} nodules, "
                             f"{len(self.neg)} non-nodules")
        self.crops = _Crops(cache, crop, crop_spacing, context)
        self.samples_per_epoch, self.seed, self.epoch = int(samples_per_epoch), seed, 0
        self.hard: np.ndarray = np.zeros(0, np.int64)  # indices into self.neg
        self.hard_share = 0.0
        self.detector_neg = [s for s in detector_negatives if not s.is_nodule]
        self.detector_pick = np.arange(len(self.detector_neg))  # indices into detector_neg that are drawn
        self.detector_share = 0.0
        self.insert_share = float(insert_share)

    def set_detector_share(self, share: float, pick=None) -> None:
        """Draw ``share`` of the negatives from :attr:`detector_neg` (0: none): from the ``pick``
        indices into it alone when given (the ones the classifier scores highest, say), else from all."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"detector-negative share must be in [0, 1], got {share}")
        n = len(self.detector_neg)
        self.detector_pick = np.arange(n) if pick is None else np.asarray(pick, np.int64).reshape(-1)
        self.detector_share = float(share) if self.detector_pick.size else 0.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_hard_negatives(self, indices, share: float) -> None:
        """Draw ``share`` of the negatives from ``indices`` (into :attr:`neg`), the rest uniformly."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"hard-negative share must be in [0, 1], got {share}")
        self.hard = np.asarray(indices, np.int64).reshape(-1)
        self.hard_share = float(share) if self.hard.size else 0.0

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int):
        if index % 2 == 0:
            if self.insert_share:
                rng = np.random.default_rng((self.seed, self.epoch, int(index), 2))
                if rng.random() < self.insert_share:
                    crop = self._inserted(rng)
                    if crop is not None:
                        return crop, 1
            j = index // 2
            cycle, k = divmod(j, len(self.pos))
            perm = np.random.default_rng((self.seed, self.epoch, cycle, 1)).permutation(len(self.pos))
            return self.crops(self.pos[perm[k]]), 1
        rng = np.random.default_rng((self.seed, self.epoch, int(index), 0))
        if self.detector_share and rng.random() < self.detector_share:
            return self.crops(self.detector_neg[self.detector_pick[rng.integers(self.detector_pick.size)]]), 0
        if self.hard_share and rng.random() < self.hard_share:
            return self.crops(self.neg[self.hard[rng.integers(self.hard.size)]]), 0
        return self.crops(self.neg[rng.integers(len(self.neg))]), 0

    def _inserted(self, rng: np.random.Generator, tries: int = 8) -> torch.Tensor | None:
        # a candidate outside the lung (a rib, the chest wall) takes no nodule: try another
        from nodulekit.data.insert import inserted_crop

        for _ in range(tries):
            s = self.neg[rng.integers(len(self.neg))]
            vol = self.crops.cache.get(s.path)
            crop = inserted_crop(vol.hu, vol.spacing, s.center_irc, self.crops.crop, self.crops.crop_spacing,
                                 rng, offset_radii=INSERT_OFFSET, context=self.crops.context)
            if crop is not None:
                return torch.from_numpy(crop)
        return None


class ClsValDataset(Dataset):
    """Held-out candidates: every nodule and up to ``max_negatives`` non-nodules (a fixed sample).

    Items are ``(crop, label)``; :attr:`samples` keeps them in order.
    """

    def __init__(self, samples: Sequence[ClsSample], cache, max_negatives: int | None = 2000, seed: int = 0,
                 crop=CLS_CROP, crop_spacing=None, context=None):
        pos = [s for s in samples if s.is_nodule]
        neg = [s for s in samples if not s.is_nodule]
        if max_negatives is not None and len(neg) > max_negatives:
            keep = np.sort(np.random.default_rng(seed).choice(len(neg), max_negatives, replace=False))
            neg = [neg[i] for i in keep]
        self.samples = pos + neg
        self.crops = _Crops(cache, crop, crop_spacing, context)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        s = self.samples[index]
        return self.crops(s), int(s.is_nodule)


def load_cls_samples(data_dir: str | Path, uids: Sequence[str] | None = None, cache=None,
                     table: str | Path | None = None) -> list[ClsSample]:
    """Candidates of a LUNA16-layout folder, merged with its annotations and located in voxels.

    Args:
        data_dir: folder with ``subset*/``, ``candidates_V2.csv`` or ``candidates.csv``, and ``annotations.csv``.
        uids: keep only these series (default: every scan found).
        cache: VolumeCache used to read each scan's geometry.
        table: another candidates table to read instead of the folder's own.
    """
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.luna import (candidates_table, find_series, merge_candidates, read_annotations,
                                     read_candidates)

    data_dir = Path(data_dir)
    series = find_series(data_dir)
    cands = read_candidates(table if table is not None else candidates_table(data_dir))
    ann = read_annotations(data_dir / "annotations.csv") if (data_dir / "annotations.csv").is_file() else []
    keep = set(series if uids is None else uids) & set(series)
    cache = cache if cache is not None else VolumeCache(data_dir / ".cache")
    by_uid: dict[str, list] = {}
    for c in merge_candidates([c for c in cands if c.seriesuid in keep], ann):
        by_uid.setdefault(c.seriesuid, []).append(c)
    out = []
    for uid in sorted(by_uid):
        ct = cache.get(series[uid])
        irc = ct.world_to_voxel(np.array([c.center_xyz for c in by_uid[uid]]).reshape(-1, 3))
        out += [ClsSample(uid, str(series[uid]), tuple(float(v) for v in p), c.is_nodule, c.diameter_mm)
                for c, p in zip(by_uid[uid], irc)]
    return out


def build_cls_datasets(data_dir: str | Path, *, val_fraction: float = VAL_FRACTION, split_file: str | Path | None = None,
                       samples_per_epoch: int = 2048, val_max_negatives: int | None = 2000, seed: int = 0, cache=None,
                       crop_spacing=None, detector_candidates: str | Path | None = None,
                       insert_share: float = 0.0, context=None) -> tuple[ClsTrainDataset, ClsValDataset]:
    """Balanced training and held-out validation datasets, split by seriesuid like segmentation
    (:func:`nodulekit.data.split.resolve_split`: ``split_file``'s scans when one is given, else
    ``val_fraction`` of them); crops of ``crop_spacing`` mm per voxel (``None``: native voxels). The
    non-nodules of ``detector_candidates`` (a candidates table) that lie on training scans become the
    training set's ``detector_negatives``; validation never sees them. ``insert_share`` of the training
    positives are inserted nodules (see :class:`ClsTrainDataset`); validation has only real ones.
    ``context``: a second, coarser channel (:func:`nodulekit.data.crops.cls_input`)."""
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.luna import find_series
    from nodulekit.data.split import resolve_split

    uids = sorted(find_series(data_dir))
    if not uids:
        raise InputError(data_dir, "no CT scans found (expected subset*/<uid>.mhd)")
    cache = cache if cache is not None else VolumeCache(Path(data_dir) / ".cache")
    train_uids, val_uids = resolve_split(uids, val_fraction, split_file)
    train_set, val_set = set(train_uids), set(val_uids)
    samples = load_cls_samples(data_dir, [u for u in uids if u in train_set or u in val_set], cache)
    train = [s for s in samples if s.seriesuid in train_set]
    val = [s for s in samples if s.seriesuid in val_set]
    log.info("classifier data: %d training candidates (%d nodules), %d validation (%d nodules)",
             len(train), sum(s.is_nodule for s in train), len(val), sum(s.is_nodule for s in val))
    detector = []
    if detector_candidates is not None:
        detector = load_cls_samples(data_dir, train_uids, cache, table=detector_candidates)
    train_ds = ClsTrainDataset(train, cache, samples_per_epoch, seed, crop_spacing=crop_spacing,
                               detector_negatives=detector, insert_share=insert_share, context=context)
    if detector_candidates is not None:
        log.info("detector negatives: %d on %d training scans from %s", len(train_ds.detector_neg),
                 len({s.seriesuid for s in train_ds.detector_neg}), detector_candidates)
    return (train_ds,
            ClsValDataset(val, cache, val_max_negatives, seed, crop_spacing=crop_spacing, context=context))
