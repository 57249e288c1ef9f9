"""Reading and writing CT volumes with SimpleITK.

``read_ct`` accepts MetaImage (``.mhd`` + ``.raw``/``.zraw``, or ``.mha``), NIfTI (``.nii``,
``.nii.gz``) and DICOM series folders, checks what a detector needs (one 3-D scalar CT volume of
finite, CT-like HU with enough slices) and returns a :class:`CTVolume`. The files are checked
before SimpleITK sees them (:mod:`nodulekit.data.validate`): what it would read silently as zeros,
noise or 1 mm is refused first. Every problem is an ``InputError`` that names the file, so batch
jobs (``iter_ct_inputs``) can report it and go on; ITK's own messages stay off the console.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from nodulekit.data import validate
from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("data")

METAIMAGE_SUFFIXES = (".mhd", ".mha")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SCAN_SUFFIXES = METAIMAGE_SUFFIXES + NIFTI_SUFFIXES

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


def read_ct(path: str | Path, *, min_slices: int = 1, allow_external_data: bool = False) -> CTVolume:
    """Read one CT scan in Hounsfield units.

    Args:
        path: a ``.mhd``/``.mha`` file, a ``.nii``/``.nii.gz`` file, a folder holding one such
            file, or a folder holding one DICOM series.
        min_slices: fewest slices accepted (detection needs 7 for its slice context).
        allow_external_data: accept a MetaImage ``ElementDataFile`` outside the header's folder.

    Returns:
        The volume, HU as int16 when the source is integral and float32 otherwise.

    Raises:
        InputError: the file is missing, not a regular file, unreadable, truncated or corrupt, has
            a malformed header (see :mod:`nodulekit.data.validate`), is not a 3-D scalar CT volume,
            holds NaN/Inf or values that are not CT HU, or has fewer than ``min_slices`` slices.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        # the folder as `nodulekit detect` expands it: one scan found in it stands for the folder
        scans = list(_expand(path))
        if len(scans) > 1:
            names = ", ".join(str(p.relative_to(path)) for p in scans[:3])
            raise InputError(path, f"holds {len(scans)} scans ({names}{', ...' if len(scans) > 3 else ''}); "
                                   f"name one of them")
        if scans[0] != path:
            return read_ct(scans[0], min_slices=min_slices, allow_external_data=allow_external_data)
        img, seriesuid = _read_dicom_series(path)
    else:
        suffix = scan_suffix(path)
        if not suffix:
            hint = " (pass the folder of a DICOM series)" if path.suffix.lower() == ".dcm" else ""
            raise InputError(path, f"unsupported file type{hint}; expected .mhd, .mha, .nii, "
                                   f".nii.gz or a DICOM folder")
        if suffix in METAIMAGE_SUFFIXES:
            validate.check_metaimage(path, allow_external_data=allow_external_data)
        else:
            validate.check_nifti(path)
        img = _read_image(path)
        seriesuid = scan_stem(path)
    return _to_volume(img, path, seriesuid, min_slices)


def iter_ct_inputs(paths: Iterable[str | Path], *, min_slices: int = 1, allow_external_data: bool = False
                   ) -> Iterator[tuple[str, CTVolume | InputError]]:
    """Expand inputs into scans and read them one at a time.

    Each path may be a scan file, a DICOM series folder, or a folder of scans (a LUNA16
    ``subsetN/`` folder or the dataset root with ``subset0..9``; a ``masks/`` folder is skipped).
    Scans of a folder come sorted by path. Only one volume is held at a time.

    Args:
        paths: files and folders, in the order to process them.
        min_slices, allow_external_data: passed to :func:`read_ct`.

    Yields:
        ``(item, volume)`` or ``(item, InputError)``, where ``item`` is the scan's path as a string.
        A failure no check foresaw (a reader's exception, memory) becomes an ``InputError`` of that
        item too: one bad scan never ends the batch.
    """
    for path in paths:
        try:
            items = list(_expand(Path(path)))
        except OSError as exc:
            yield str(path), InputError(path, f"cannot list it ({exc.strerror})")
            continue
        for item in items:
            try:
                yield str(item), read_ct(item, min_slices=min_slices, allow_external_data=allow_external_data)
            except InputError as exc:
                yield str(item), exc
            except (MemoryError, OSError, RuntimeError, ValueError) as exc:
                reason = (str(exc).strip().splitlines() or [""])[-1].strip()
                yield str(item), InputError(item, f"cannot read it ({type(exc).__name__}: {reason})")


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
        if not p.is_dir() and scan_suffix(p):  # a FIFO named .mhd is reported by read_ct, not skipped
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


@contextlib.contextmanager
def quiet_itk():
    """Keep ITK's and GDCM's own console messages (written by C++ straight to file descriptor 2)
    off stderr while a file is read: a read that fails is reported by one ``InputError`` line,
    and the messages go to the debug log."""
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    with tempfile.TemporaryFile() as sink:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to protect
            yield
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            noise = sink.read().decode("utf-8", "replace").strip()
            if noise:
                log.debug("ITK: %s", " | ".join(noise.splitlines())[:2000])


def _reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def _read_image(path: Path):
    import SimpleITK as sitk

    try:
        with quiet_itk():
            return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"SimpleITK cannot read it ({_reason(exc)})") from None


def read_metaimage_header(path: str | Path) -> dict[str, str]:
    """The ``key = value`` pairs of a MetaImage header, up to ``ElementDataFile``."""
    return validate.read_metaimage_header(path)[0]


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not files:
        raise InputError(folder, "empty folder")
    for p in files:
        if not p.is_dir():
            validate.check_regular_file(p)  # GDCM would block on a FIFO
    reader = sitk.ImageSeriesReader()
    with quiet_itk():
        series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(folder, "no DICOM series (nor .mhd/.nii scan) in this folder")
    if len(series) > 1:
        raise InputError(folder, f"holds {len(series)} DICOM series ({', '.join(sorted(series))}); "
                                 f"put each series in its own folder")
    uid = series[0]
    with quiet_itk():
        names = reader.GetGDCMSeriesFileNames(str(folder), uid)
    # other files (an annotation .xml, a DICOMDIR) may sit beside a series; a .dcm left out is broken
    taken = {os.path.realpath(n) for n in names}
    left_out = [p.name for p in files if p.suffix.lower() == ".dcm" and os.path.realpath(p) not in taken]
    if left_out:
        raise InputError(folder, f"{len(left_out)} .dcm file(s) are not part of DICOM series {uid}, e.g. "
                                 f"{left_out[0]} (unreadable, or another series)")
    validate.check_dicom_headers(folder, names)
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with quiet_itk():
            img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(folder, f"SimpleITK cannot read the DICOM series ({_reason(exc)})") from None
    _check_slice_gaps(folder, reader, img, len(names))
    return img, uid


def _check_slice_gaps(folder: Path, reader, img, n: int) -> None:
    """Reject series with missing or uneven slices: the volume would be stretched silently."""
    if n < 3:
        return
    normal = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    try:
        pos = [np.array(reader.GetMetaData(i, "0020|0032").split("\\"), dtype=np.float64) for i in range(n)]
    except (RuntimeError, ValueError):
        raise InputError(folder, "unreadable ImagePositionPatient (0020,0032): slice order unknown") from None
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
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError(path, "direction matrix is not orthonormal")
    spacing, origin = img.GetSpacing(), img.GetOrigin()
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(path, f"spacing {spacing}: must be positive and finite")
    if not all(np.isfinite(origin)):
        raise InputError(path, f"origin {origin}: must be finite")
    arr = sitk.GetArrayFromImage(img)
    if integral:
        if arr.dtype != np.int16:
            lo, hi = arr.min(), arr.max()
            if lo < _INT_RANGE[0] or hi > _INT_RANGE[1]:
                # no CT value leaves int16 (-1024 air to a few thousand for metal): these are not HU
                raise InputError(path, f"values from {lo} to {hi} leave the int16 range: not CT HU (a wrong "
                                       f"rescale, pixel type or truncated pixel data?)")
            arr = arr.astype(np.int16)
    else:
        arr = arr.astype(np.float32, copy=False)
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(path, f"{bad} NaN/Inf voxel(s)")
    validate.check_hu(path, arr)
    return CTVolume(hu=arr, origin=origin, spacing=spacing, direction=direction,
                    seriesuid=seriesuid, source=str(path))
