"""A disk cache of decoded CT volumes and crops, shared safely by DataLoader worker processes.

Decoding a compressed ``.zraw`` or a DICOM series costs far more than reading a ``.npy``, and
training asks for the same scans every epoch. ``VolumeCache`` stores each decoded volume once as a
``.npy`` (HU) plus a JSON of geometry, keyed by the source's resolved path, size and mtime, and
hands out read-only memmaps afterwards. Every file is written through
:func:`nodulekit.io.atomic_write`, so concurrent workers at worst decode the same scan twice and never
see a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from nodulekit.data.crops import crop_hu, resampled_crop
from nodulekit.data.ct import read_ct, read_metaimage_header, scan_suffix
from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError
from nodulekit.io import atomic_write, atomic_write_text


def _save_npy(path: Path, array: np.ndarray) -> Path:
    """``np.save`` of ``array`` to ``path``, whole or not at all."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to the temporary name
            np.save(fh, array)

    return atomic_write(path, write)


def _stat_parts(path: Path) -> list[str]:
    st = path.stat()
    return [str(path.resolve()), str(st.st_size), str(st.st_mtime_ns)]


class VolumeCache:
    """Decoded CT volumes and crops on disk.

    Args:
        cache_dir: where to keep ``<key>.npy``/``<key>.json`` and ``crops/``; created if needed.
        data_dir: optional LUNA16-style dataset folder, so that :meth:`get` also accepts seriesuids.
    """

    def __init__(self, cache_dir: str | Path, data_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._series: dict[str, Path] | None = None

    def resolve(self, path_or_uid: str | Path) -> Path:
        """The scan path for a path or (with ``data_dir``) a seriesuid."""
        path = Path(path_or_uid)
        if path.exists() or self.data_dir is None:
            return path
        if self._series is None:
            from nodulekit.data.luna import find_series

            self._series = find_series(self.data_dir)
        if str(path_or_uid) in self._series:
            return self._series[str(path_or_uid)]
        raise InputError(path_or_uid, f"no such file, nor a seriesuid under {self.data_dir}")

    def key(self, path_or_uid: str | Path) -> str:
        """The cache key of a scan: a hash of its files' resolved paths, sizes and mtimes."""
        path = self.resolve(path_or_uid)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        parts = _stat_parts(path)
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file():
                    parts += [child.name, *_stat_parts(child)[1:]]
        elif scan_suffix(path) == ".mhd":
            data = read_metaimage_header(path).get("ElementDataFile", "")
            if data and (path.parent / data).is_file():
                parts += _stat_parts(path.parent / data)
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]

    def get(self, path_or_uid: str | Path, *, min_slices: int = 1) -> CTVolume:
        """Return the volume with its HU as a read-only memmap, decoding the source only once.

        Raises:
            InputError: as :func:`nodulekit.data.ct.read_ct`.
        """
        path = self.resolve(path_or_uid)
        key = self.key(path)
        vol = self._load(key)
        if vol is None:
            ct = read_ct(path, min_slices=min_slices)
            self._store(key, ct)
            vol = self._load(key)
        if vol.shape[0] < min_slices:
            raise InputError(path, f"{vol.shape[0]} slice(s), need at least {min_slices}")
        return vol

    def crop(self, path_or_uid: str | Path, center_irc, shape, crop_spacing=None) -> np.ndarray:
        """A classifier crop (see :mod:`nodulekit.data.crops`), cached on disk per
        (volume, centre, shape, crop spacing).

        Native crops (``crop_spacing=None``) keep the volume's dtype and are keyed by the rounded
        centre; resampled ones are float32 and keyed by the centre to 0.01 voxel.
        """
        key = self.key(path_or_uid)
        shape = tuple(int(s) for s in shape)
        if crop_spacing is None:
            center = tuple(int(v) for v in np.rint(np.asarray(center_irc, dtype=np.float64)))
            name = "_".join(map(str, center)) + "__" + "x".join(map(str, shape)) + ".npy"
        else:
            center = tuple(round(float(v), 2) for v in center_irc)
            name = ("_".join(f"{v:.2f}" for v in center) + "__" + "x".join(map(str, shape)) + "__"
                    + "x".join(f"{float(v):g}" for v in crop_spacing) + "mm.npy")
        folder = self.cache_dir / "crops" / key
        target = folder / name
        if target.is_file():
            try:
                return np.load(target)
            except (ValueError, OSError):
                pass  # unreadable entry: rebuild it below
        vol = self.get(path_or_uid)
        if crop_spacing is None:
            crop = crop_hu(vol.hu, center, shape)  # stored in the volume's dtype (int16: half the disk)
        else:
            crop = resampled_crop(vol.hu, vol.spacing[::-1], center, shape, crop_spacing)
        _save_npy(target, crop)
        return crop

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"

    def _store(self, key: str, ct: CTVolume) -> None:
        npy, meta = self._paths(key)
        hu = np.ascontiguousarray(ct.hu)
        info = {
            "origin": list(ct.origin), "spacing": list(ct.spacing),
            "direction": np.asarray(ct.direction).reshape(-1).tolist(), "seriesuid": ct.seriesuid,
            "source": ct.source, "shape": list(hu.shape), "dtype": str(hu.dtype),
        }
        # the array goes first: a JSON on disk means its array is complete
        _save_npy(npy, hu)
        atomic_write_text(meta, json.dumps(info))

    def _load(self, key: str) -> CTVolume | None:
        npy, meta = self._paths(key)
        if not meta.is_file() or not npy.is_file():
            return None
        try:
            info = json.loads(meta.read_text())
            hu = np.load(npy, mmap_mode="r")
        except (ValueError, OSError):
            return None
        if list(hu.shape) != info["shape"]:
            return None
        return CTVolume(hu=hu, origin=info["origin"], spacing=info["spacing"],
                        direction=np.asarray(info["direction"]).reshape(3, 3),
                        seriesuid=info["seriesuid"], source=info["source"])
