"""Reading and writing CT volumes with SimpleITK.

``read_ct`` accepts MetaImage (``.mhd`` + ``.raw``/``.zraw``, or ``.mha``), NIfTI (``.nii``,
``.nii.gz``) and DICOM series folders, checks what a detector needs (one 3-D scalar CT volume of
finite HU with enough slices) and returns a :class:`CTVolume`. Every problem is an ``InputError``
that names the file, so batch jobs (``iter_ct_inputs``) can report it and go on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("data")

METAIMAGE_SUFFIXES = (".mhd", ".mha")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SCAN_SUFFIXES = METAIMAGE_SUFFIXES + NIFTI_SUFFIXES

_MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
# HU run from -1024 (air) to a few thousand (metal): signed types of 16 bits or more hold them.
_MET_ACCEPTED = ("MET_SHORT", "MET_INT", "MET_LONG", "MET_LONG_LONG", "MET_FLOAT", "MET_DOUBLE")
_INT_RANGE = (np.iinfo(np.int16).min, np.iinfo(np.int16).max)


def scan_suffix(path: str | Path) -> str:
    """The scan suffix of ``path`` (``.nii.gz`` counts as one), lower-cased, or ``""``."""
    name = Path(path).name.lower()
    for suffix in SCAN_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def scan_stem(path: str | Path) -> str:
    """The file name without its scan suffix: the seriesuid of a LUNA16-style file."""
    name = Path(path).name
    suffix = scan_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else Path(path).stem


def read_ct(path: str | Path, *, min_slices: int = 1) -> CTVolume:
    """Read one CT scan in Hounsfield units.

    Args:
        path: a ``.mhd``/``.mha`` file, a ``.nii``/``.nii.gz`` file, or a folder holding one DICOM
            series.
        min_slices: fewest slices accepted (detection needs 7 for its slice context).

    Returns:
        The volume, HU as int16 when the source is integral and float32 otherwise.

    Raises:
        InputError: the file is missing, unreadable, truncated, not a 3-D scalar CT volume, holds
            NaN/Inf, or has fewer than ``min_slices`` slices.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        img, seriesuid = _read_dicom_series(path)
    else:
        suffix = scan_suffix(path)
        if not suffix:
            hint = " (pass the folder of a DICOM series)" if path.suffix.lower() == ".dcm" else ""
            raise InputError(path, f"unsupported file type{hint}; expected .mhd, .mha, .nii, "
                                   f".nii.gz or a DICOM folder")
        if suffix == ".mhd":
            _check_metaimage_header(path)
        img = _read_image(path)
        seriesuid = scan_stem(path)
    return _to_volume(img, path, seriesuid, min_slices)


def iter_ct_inputs(paths: Iterable[str | Path], *, min_slices: int = 1
                   ) -> Iterator[tuple[str, CTVolume | InputError]]:
    """Expand inputs into scans and read them one at a time.

    Each path may be a scan file, a DICOM series folder, or a folder of scans (a LUNA16
    ``subsetN/`` folder or the dataset root with ``subset0..9``; a ``masks/`` folder is skipped).
    Scans of a folder come sorted by path. Only one volume is held at a time.

    Args:
        paths: files and folders, in the order to process them.
        min_slices: passed to :func:`read_ct`.

    Yields:
        ``(item, volume)`` or ``(item, InputError)``, where ``item`` is the scan's path as a string.
    """
    for path in paths:
        for item in _expand(Path(path)):
            try:
                yield str(item), read_ct(item, min_slices=min_slices)
            except InputError as exc:
                yield str(item), exc


def write_ct(ct: CTVolume, path: str | Path, compress: bool = False, dtype=np.int16) -> Path:
    """Write a volume as MetaImage (``.mhd`` + ``.raw``/``.zraw``) or NIfTI, by the suffix of ``path``."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(ct.hu).astype(dtype, copy=False))
    img.SetOrigin(ct.origin)
    img.SetSpacing(ct.spacing)
    img.SetDirection(tuple(float(v) for v in np.asarray(ct.direction).reshape(-1)))
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def _expand(path: Path, top: bool = True) -> Iterator[Path]:
    """Scan files and DICOM folders under ``path``, depth first, sorted; ``masks/`` and hidden
    folders are skipped. A top-level folder with nothing in it is yielded for read_ct to report."""
    if not path.is_dir() or is_dicom_folder(path):
        yield path
        return
    children = sorted(path.iterdir())
    found = False
    for p in children:
        if p.is_file() and scan_suffix(p):
            found = True
            yield p
    for p in children:
        if p.is_dir() and p.name != "masks" and not p.name.startswith("."):
            for item in _expand(p, top=False):
                found = True
                yield item
    if top and not found:
        yield path


def is_dicom_folder(path: Path, probe: int = 8) -> bool:
    """Whether a folder directly holds DICOM files (by ``.dcm`` suffix or the ``DICM`` preamble)."""
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    for p in files[:probe]:
        try:
            with open(p, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def _read_image(path: Path):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else "unknown error"
        raise InputError(path, f"SimpleITK cannot read it ({reason})") from None


def read_metaimage_header(path: str | Path) -> dict[str, str]:
    """The ``key = value`` pairs of a MetaImage header, up to ``ElementDataFile``."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise InputError(path, f"cannot read header ({exc.strerror})") from None
    header = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break  # binary data may follow in an .mha
    return header


def _check_metaimage_header(path: Path) -> None:
    """Check a ``.mhd`` header and its data file before SimpleITK sees them: its own messages
    name the header and blame a missing file even for truncated data."""
    h = read_metaimage_header(path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in h:
            raise InputError(path, f"not a MetaImage header: no {key}")
    etype = h["ElementType"]
    if etype not in _MET_SIZES:
        raise InputError(path, f"unsupported ElementType {etype}; a CT volume needs one of "
                               f"{', '.join(_MET_ACCEPTED)}")
    channels = int(h.get("ElementNumberOfChannels", "1") or 1)
    if channels != 1:
        raise InputError(path, f"{channels}-channel image ({etype} x {channels}); a CT volume has one")
    if etype not in _MET_ACCEPTED:
        raise InputError(path, f"unsupported ElementType {etype}: cannot hold HU (air is -1000); "
                               f"need one of {', '.join(_MET_ACCEPTED)}")
    try:
        ndims = int(h["NDims"])
        dims = [int(v) for v in h["DimSize"].split()]
    except ValueError:
        raise InputError(path, f"bad NDims/DimSize {h['NDims']!r}/{h['DimSize']!r}") from None
    if ndims != 3 or len(dims) != 3:
        raise InputError(path, f"{ndims}-D image; a CT volume is 3-D")
    data_name = h["ElementDataFile"]
    if data_name.upper() == "LOCAL" or data_name.upper().startswith("LIST") or " " in data_name:
        return
    data = path.parent / data_name
    if not data.is_file():
        raise InputError(path, f"data file {data.name} not found next to the header")
    actual = data.stat().st_size
    raw_bytes = int(np.prod(dims)) * _MET_SIZES[etype]
    if h.get("CompressedData", "False").lower() == "true":
        if "CompressedDataSize" not in h:
            _check_zlib_stream(path, data, raw_bytes)
            return
        expected = int(h["CompressedDataSize"] or 0)
        what = "compressed bytes"
    else:
        expected = raw_bytes + max(int(h.get("HeaderSize", "0") or 0), 0)
        what = f"bytes for DimSize {' x '.join(map(str, dims))} of {etype}"
    if actual < expected:
        raise InputError(path, f"data file {data.name} is truncated: {actual} bytes, "
                               f"expected {expected} {what}")


def _check_zlib_stream(header: Path, data: Path, raw_bytes: int) -> None:
    """Inflate without keeping the output: SimpleITK reads a cut zlib stream without complaint."""
    import zlib

    inflater = zlib.decompressobj()
    total = 0
    try:
        with open(data, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(inflater.decompress(chunk))
        total += len(inflater.flush())
    except zlib.error as exc:
        raise InputError(header, f"data file {data.name} is corrupt ({exc})") from None
    if not inflater.eof or total < raw_bytes:
        raise InputError(header, f"data file {data.name} is truncated: inflates to {total} bytes, "
                                 f"expected {raw_bytes}")


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not files:
        raise InputError(folder, "empty folder")
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(folder, "no DICOM series (nor .mhd/.nii scan) in this folder")
    if len(series) > 1:
        raise InputError(folder, f"holds {len(series)} DICOM series ({', '.join(sorted(series))}); "
                                 f"put each series in its own folder")
    uid = series[0]
    names = reader.GetGDCMSeriesFileNames(str(folder), uid)
    _check_modality(folder, names)
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].strip()
        raise InputError(folder, f"SimpleITK cannot read the DICOM series ({reason})") from None
    _check_slice_gaps(folder, reader, img, len(names))
    return img, uid


def _check_modality(folder: Path, names) -> None:
    import pydicom

    modalities = set()
    for name in names:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception as exc:  # pydicom raises many types for broken files
            raise InputError(name, f"unreadable DICOM header ({type(exc).__name__})") from None
        modalities.add(str(ds.get("Modality", "")).strip() or "missing")
    if modalities != {"CT"}:
        raise InputError(folder, f"DICOM Modality (0008,0060) is {'/'.join(sorted(modalities))}, "
                                 f"not CT")


def _check_slice_gaps(folder: Path, reader, img, n: int) -> None:
    """Reject series with missing or uneven slices: the volume would be stretched silently."""
    if n < 3:
        return
    normal = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    try:
        pos = [np.array(reader.GetMetaData(i, "0020|0032").split("\\"), dtype=np.float64) for i in range(n)]
    except (RuntimeError, ValueError):
        return
    gaps = np.diff(np.asarray(pos) @ normal)
    if gaps.min() <= 0 or gaps.max() > 1.5 * gaps.min():
        raise InputError(folder, f"uneven DICOM slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm): "
                                 f"missing or duplicate slices")


def _to_volume(img, path: Path, seriesuid: str, min_slices: int) -> CTVolume:
    import SimpleITK as sitk

    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise InputError(path, f"{img.GetDimension()}-D image; a CT volume is 3-D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{img.GetNumberOfComponentsPerPixel()}-component pixels "
                               f"({img.GetPixelIDTypeAsString()}); a CT volume has one")
    pid = img.GetPixelID()
    integral = pid in (sitk.sitkInt16, sitk.sitkInt32, sitk.sitkInt64)
    if not integral and pid not in (sitk.sitkFloat32, sitk.sitkFloat64):
        raise InputError(path, f"unsupported pixel type {img.GetPixelIDTypeAsString()}: cannot hold HU "
                               f"(air is -1000)")
    n_slices = img.GetSize()[2]
    if n_slices < min_slices:
        raise InputError(path, f"{n_slices} slice(s), need at least {min_slices}")
    arr = sitk.GetArrayFromImage(img)
    if integral:
        if arr.dtype != np.int16:
            lo, hi = arr.min(), arr.max()
            if lo < _INT_RANGE[0] or hi > _INT_RANGE[1]:
                log.warning("%s: HU outside int16 range [%d, %d], clipped", path, lo, hi)
                arr = np.clip(arr, *_INT_RANGE)
            arr = arr.astype(np.int16)
    else:
        arr = arr.astype(np.float32, copy=False)
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(path, f"{bad} NaN/Inf voxel(s)")
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError(path, "direction matrix is not orthonormal")
    spacing = img.GetSpacing()
    if min(spacing) <= 0:
        raise InputError(path, f"non-positive spacing {spacing}")
    return CTVolume(hu=arr, origin=img.GetOrigin(), spacing=spacing, direction=direction,
                    seriesuid=seriesuid, source=str(path))
