"""Segmentation datasets: 7-slice crops around nodules for training, whole slices for validation.

A scan is held as a :class:`SegScan`: its HU volume (usually the VolumeCache's read-only memmap,
so nothing is decoded twice and DataLoader workers share the pages) plus the label slices that hold
nodule voxels. Labels are sparse because nodules touch a few dozen slices of a few hundred.

Training samples (:class:`SegTrainDataset`) are drawn from ``(seed, epoch, index)`` alone, so a run
is reproducible with any number of DataLoader workers or DDP ranks, and a resumed run sees the same
samples as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nodulekit import VAL_FRACTION
from nodulekit.data.seg_input import seg_context
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("data")

BODY_HU = -500.0  # denser than lung parenchyma: outlines the body for background crops


@dataclass
class SegScan:
    """One scan, ready for segmentation sampling.

    Attributes:
        uid: seriesuid.
        hu: ``(Z, H, W)`` HU volume (int16 memmap or any array).
        label_slices: ``z -> (H, W)`` uint16 label ids, only for slices holding nodule voxels.
        diameters: label id -> nodule diameter in mm (annotation row ``k`` is label ``k``).
        voxels: label id -> ``(K, 3)`` voxel (index, row, col) of that nodule.
        body_box: ``(row0, row1, col0, col1)`` bounding box of the body (HU > -500).
        lookalikes: ``(K, 3)`` voxel (index, row, col) of the scan's non-nodule candidates
            (``candidates.csv`` class 0: vessels seen end-on, airway walls, scars), the structures
            a segmentation model mistakes for nodules.
    """

    uid: str
    hu: np.ndarray
    label_slices: dict[int, np.ndarray]
    diameters: dict[int, float]
    voxels: dict[int, np.ndarray] = field(default_factory=dict)
    body_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    lookalikes: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int32))

    @classmethod
    def from_labels(cls, uid: str, hu: np.ndarray, labels: np.ndarray, diameters: dict[int, float],
                    lookalikes: np.ndarray | None = None) -> SegScan:
        """Build from a dense label volume (0 background, k = k-th nodule); ``lookalikes`` are
        non-nodule candidate voxels (those outside the volume are dropped)."""
        if tuple(labels.shape) != tuple(hu.shape):
            raise InputError(uid, f"label volume {tuple(labels.shape)} does not match CT {tuple(hu.shape)}")
        zs = np.flatnonzero(np.asarray(labels).reshape(labels.shape[0], -1).any(axis=1))
        label_slices = {int(z): np.asarray(labels[z], dtype=np.uint16) for z in zs}
        voxels: dict[int, list] = {}
        for z, sl in label_slices.items():
            rows, cols = np.nonzero(sl)
            ids = sl[rows, cols]
            for k in np.unique(ids):
                sel = ids == k
                voxels.setdefault(int(k), []).append(
                    np.stack([np.full(sel.sum(), z), rows[sel], cols[sel]], axis=1))
        vox = {k: np.concatenate(v).astype(np.int32) for k, v in voxels.items()}
        return cls(uid, hu, label_slices, {int(k): float(d) for k, d in diameters.items()}, vox, body_box(hu),
                   _inside(lookalikes, hu.shape))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def labels(self, z: int) -> np.ndarray:
        """``(H, W)`` label ids of slice ``z`` (zeros where no nodule)."""
        sl = self.label_slices.get(int(z))
        return np.zeros(self.shape[1:], np.uint16) if sl is None else sl

    def context(self, z: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """7-channel network input ``(7, h, w)`` float32 around slice ``z``
        (:func:`~nodulekit.data.seg_input.seg_context`)."""
        return seg_context(self.hu, z, rows, cols)


def _inside(irc, shape) -> np.ndarray:
    """Rounded voxel coordinates ``(K, 3)`` int32 that lie inside ``shape``."""
    if irc is None or len(irc) == 0:
        return np.zeros((0, 3), np.int32)
    p = np.rint(np.asarray(irc, dtype=np.float64).reshape(-1, 3)).astype(np.int64)
    ok = np.all((p >= 0) & (p < np.asarray(shape)), axis=1)
    return p[ok].astype(np.int32)


def body_box(hu: np.ndarray, step: int = 4) -> tuple[int, int, int, int]:
    """Row/col bounding box of voxels denser than lung (a coarse body outline)."""
    sub = np.asarray(hu[::step, ::step, ::step]) > BODY_HU
    rows, cols = np.flatnonzero(sub.any(axis=(0, 2))), np.flatnonzero(sub.any(axis=(0, 1)))
    h, w = hu.shape[1:]
    if rows.size == 0:
        return 0, h, 0, w
    return (int(rows[0] * step), min(h, int(rows[-1] * step + step)),
            int(cols[0] * step), min(w, int(cols[-1] * step + step)))


class SegTrainDataset(Dataset):
    """Random ``(7, crop, crop)`` training crops with ``(1, crop, crop)`` 0/1 masks.

    A sample is positive with probability ``1 - negative_share``: a nodule is picked uniformly (so
    small nodules count as much as big ones), then one of its voxels, and the crop is placed at a
    random offset inside the ``window`` x ``window`` square centred on that voxel. A negative sample
    is, with probability ``lookalike_share``, placed the same way around a non-nodule candidate
    (:attr:`SegScan.lookalikes`: vessels seen end-on, airway walls; the hard negatives), otherwise
    anywhere in the body box of a random slice (lungs, vessels, chest wall).

    Args:
        scans: training scans.
        samples_per_epoch: ``len(dataset)``.
        crop: side of the crop (a multiple of 4 for the default U-Net).
        window: side of the square around a nodule voxel the crop is taken from.
        negative_share: share of background crops.
        lookalike_share: share of the background crops centred on a non-nodule candidate (used
            only when the scans list some).
        seed: base seed; call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, scans: Sequence[SegScan], samples_per_epoch: int, *, crop: int = 64, window: int = 96,
                 negative_share: float = 0.3, lookalike_share: float = 0.5, seed: int = 0):
        if not scans:
            raise ValueError("SegTrainDataset needs at least one scan")
        if not 0.0 <= negative_share <= 1.0:
            raise ValueError(f"negative_share must be in [0, 1], got {negative_share}")
        if not 0.0 <= lookalike_share <= 1.0:
            raise ValueError(f"lookalike_share must be in [0, 1], got {lookalike_share}")
        if window < crop:
            raise ValueError(f"window ({window}) must be at least the crop ({crop})")
        self.scans = list(scans)
        self.samples_per_epoch = int(samples_per_epoch)
        self.crop, self.window, self.negative_share, self.seed = crop, window, negative_share, seed
        self.lookalike_share = lookalike_share
        self.nodules = [(s, k) for s, scan in enumerate(self.scans) for k in sorted(scan.voxels)]
        self.with_lookalikes = [s for s, scan in enumerate(self.scans) if len(scan.lookalikes)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        slack = self.window - self.crop
        centre = None
        if self.nodules and rng.random() >= self.negative_share:
            s, k = self.nodules[rng.integers(len(self.nodules))]
            scan = self.scans[s]
            centre = scan.voxels[k][rng.integers(len(scan.voxels[k]))]
        elif self.with_lookalikes and rng.random() < self.lookalike_share:
            scan = self.scans[self.with_lookalikes[rng.integers(len(self.with_lookalikes))]]
            centre = scan.lookalikes[rng.integers(len(scan.lookalikes))]
        if centre is not None:
            z, r, c = centre
            r0 = r - self.window // 2 + rng.integers(slack + 1)
            c0 = c - self.window // 2 + rng.integers(slack + 1)
        else:
            scan = self.scans[rng.integers(len(self.scans))]
            z = rng.integers(scan.shape[0])
            br0, br1, bc0, bc1 = scan.body_box
            r0 = rng.integers(br0, max(br0 + 1, br1 - self.crop + 1))
            c0 = rng.integers(bc0, max(bc0 + 1, bc1 - self.crop + 1))
        h, w = scan.shape[1:]
        r0 = int(np.clip(r0, 0, max(0, h - self.crop)))
        c0 = int(np.clip(c0, 0, max(0, w - self.crop)))
        rows, cols = slice(r0, r0 + self.crop), slice(c0, c0 + self.crop)
        image = scan.context(int(z), rows, cols)
        label = scan.labels(int(z))[rows, cols] > 0
        return torch.from_numpy(image), torch.from_numpy(label[None].astype(np.float32))


class SegValDataset(Dataset):
    """Whole slices of held-out scans: every slice holding nodule voxels plus, per scan,
    ``negative_slices`` evenly spaced slices without any.

    Items are ``(image (7, H, W) float32, labels (H, W) int64 label ids, scan index)``.
    :attr:`nodules` lists ``(scan index, label id, diameter_mm)`` for nodule-level recall.
    """

    def __init__(self, scans: Sequence[SegScan], negative_slices: int = 8):
        self.scans = list(scans)
        self.items: list[tuple[int, int]] = []
        for s, scan in enumerate(self.scans):
            pos = sorted(scan.label_slices)
            neg = np.setdiff1d(np.arange(scan.shape[0]), pos)
            if negative_slices > 0 and neg.size:
                pick = np.unique(np.linspace(0, neg.size - 1, min(negative_slices, neg.size)).round().astype(int))
                neg = neg[pick]
            else:
                neg = neg[:0]
            self.items += [(s, int(z)) for z in sorted([*pos, *neg.tolist()])]
        self.nodules = [(s, k, scan.diameters.get(k, float("nan")))
                        for s, scan in enumerate(self.scans) for k in sorted(scan.voxels)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        s, z = self.items[index]
        scan = self.scans[s]
        return scan.context(z), scan.labels(z).astype(np.int64), s


def load_seg_scans(data_dir: str | Path, uids: Sequence[str] | None = None, cache=None,
                   progress: bool = True) -> list[SegScan]:
    """Read scans of a LUNA16-layout folder with their nodule labels and, where the folder has a
    candidates table, their non-nodule candidates (:attr:`SegScan.lookalikes`).

    Args:
        data_dir: dataset folder (``subset*/``, ``annotations.csv``, optional ``masks/`` and
            ``candidates_V2.csv`` or ``candidates.csv``).
        uids: seriesuids to load (default: every scan found).
        cache: a :class:`nodulekit.data.cache.VolumeCache` (default: one under ``data_dir/.cache``).
        progress: show a progress bar.
    """
    from tqdm import tqdm

    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.luna import annotations_by_series, read_annotations, select_series
    from nodulekit.data.masks import nodule_labels

    data_dir = Path(data_dir)
    series = select_series(data_dir, uids)
    uids = list(series)
    cache = cache if cache is not None else VolumeCache(data_dir / ".cache")
    ann_csv = data_dir / "annotations.csv"
    annotations = read_annotations(ann_csv) if ann_csv.is_file() else []
    by_uid = annotations_by_series(annotations)
    lookalikes = _lookalikes(data_dir, set(uids))
    scans = []
    for uid in tqdm(uids, desc="scans", disable=not progress, leave=False):
        ct = cache.get(series[uid])
        anns = by_uid.get(uid, [])
        labels = nodule_labels(data_dir, ct, anns)
        diameters = {k: a.diameter_mm for k, a in enumerate(anns, start=1)}
        xyz = lookalikes.get(uid)
        irc = ct.world_to_voxel(np.asarray(xyz).reshape(-1, 3)) if xyz else None
        scans.append(SegScan.from_labels(uid, ct.hu, labels, diameters, irc))
    return scans


def _lookalikes(data_dir: Path, uids: set[str]) -> dict[str, list]:
    """World centres of the non-nodule candidates per seriesuid; empty without a candidates table."""
    from nodulekit.data.luna import annotations_by_series, candidates_table, read_candidates

    try:
        table = candidates_table(data_dir)
    except InputError:
        return {}
    by_uid = annotations_by_series(c for c in read_candidates(table) if not c.is_nodule and c.seriesuid in uids)
    return {uid: [c.center_xyz for c in rows] for uid, rows in by_uid.items()}


def build_seg_datasets(data_dir: str | Path, *, val_fraction: float = VAL_FRACTION, split_file: str | Path | None = None,
                       samples_per_epoch: int = 2048, crop: int = 64, window: int = 96, negative_share: float = 0.3,
                       lookalike_share: float = 0.5, val_negative_slices: int = 8, seed: int = 0, cache=None,
                       progress: bool = True) -> tuple[SegTrainDataset, SegValDataset]:
    """Training and validation datasets of a LUNA16-layout folder, split by
    :func:`nodulekit.data.split.resolve_split` (a scan is never on both sides): the held-out scans
    of ``split_file`` when one is given, else ``val_fraction`` of them by seriesuid hash."""
    from nodulekit.data.luna import find_series
    from nodulekit.data.split import resolve_split

    uids = sorted(find_series(data_dir))
    if not uids:
        raise InputError(data_dir, "no CT scans found (expected subset*/<uid>.mhd)")
    train_uids, val_uids = resolve_split(uids, val_fraction, split_file)
    scans = load_seg_scans(data_dir, train_uids + val_uids, cache=cache, progress=progress)
    by_uid = {s.uid: s for s in scans}
    log.info("segmentation data: %d training scans, %d validation scans", len(train_uids), len(val_uids))
    train = SegTrainDataset([by_uid[u] for u in train_uids], samples_per_epoch, crop=crop, window=window,
                            negative_share=negative_share, lookalike_share=lookalike_share, seed=seed)
    val = SegValDataset([by_uid[u] for u in val_uids], negative_slices=val_negative_slices)
    return train, val


class SliceSubset:
    """A few slices of a :class:`SegValDataset`, with the nodules of their scans, for
    :func:`nodulekit.evaluate.seg_metrics.evaluate_seg` (a cheap validation)."""

    def __init__(self, ds, indices: list[int]):
        self.ds, self.indices = ds, indices
        scans = {int(ds[i][2]) for i in indices}
        self.nodules = [n for n in getattr(ds, "nodules", []) if int(n[0]) in scans]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.ds[self.indices[i]]


def pick_slices(val_ds, n: int) -> list[int]:
    """Up to ``n`` validation slices, evenly spaced, preferring slices that show a nodule."""
    positive = [i for i in range(len(val_ds)) if np.any(np.asarray(val_ds[i][1]) > 0)]
    shown = set(positive)
    pool = positive if len(positive) >= n else positive + [i for i in range(len(val_ds)) if i not in shown]
    step = max(1, len(pool) // max(n, 1))
    return sorted(pool[::step][:n])
