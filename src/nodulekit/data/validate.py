"""Checks of CT files that their readers do not make, run before a byte of voxel data is allocated.

SimpleITK reads what a header declares and fills the rest with zeros, takes a data file from
anywhere on the disk, turns an unparsable number into 0 and a missing spacing into 1 mm; GDCM
gives a series without positions a z spacing of 1 mm. The checks here close those holes, each
with an :class:`~nodulekit.errors.InputError` naming the file, or a warning (:func:`warn`, one
line ``"<file>: warning: ..."``) where an assumption is reasonable and said out loud:

- :func:`check_regular_file`: FIFOs, devices and folders are refused before anything opens them.
- :func:`check_metaimage`: integer and number fields, the data file (inside the scan's folder
  unless allowed), and the bytes present against ``DimSize`` x ``ElementType`` for raw,
  compressed (``CompressedDataSize`` or not), ``LOCAL`` data and ``.mha``; zlib data is inflated
  (output dropped) so a corrupt or cut stream is an error.
- :func:`check_nifti`: the NIfTI-1 header (dims, datatype, pixdim, vox_offset, scaling,
  orientation) and the bytes present, reading a ``.nii.gz`` through to its CRC.
- :func:`check_dicom_headers`: per file, Modality, position, orientation, pixel spacing, bits and
  rescale (pydicom, headers only).
- :func:`check_hu`: the voxels read are CT-like Hounsfield units.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import stat
import struct
import zlib
from pathlib import Path

import numpy as np

from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("data")

MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
# HU run from -1024 (air) to a few thousand (metal): signed types of 16 bits or more hold them.
MET_ACCEPTED = ("MET_SHORT", "MET_INT", "MET_LONG", "MET_LONG_LONG", "MET_FLOAT", "MET_DOUBLE")
# far beyond any CT (a 512 x 512 x 4000 scan is 1e9 voxels), small enough to refuse a crafted DimSize
MAX_VOXELS = 2_000_000_000
# a CT volume's voxels lie mostly within [air, dense bone]; padding outside the field of view
# (-2048, -3024) covers at most the corners
CT_HU_RANGE = (-1100.0, 4000.0)
MIN_CT_LIKE_SHARE = 0.5
MAX_RESCALE_SLOPE = 100.0
MAX_RESCALE_INTERCEPT = 10_000.0
_HEADER_PROBE = 1 << 16  # a MetaImage header is a few hundred bytes; an .mha's voxels follow it
_INT = re.compile(r"[+-]?\d+")


def warn(source: str | Path, problem: str) -> None:
    """One named warning line: ``"<source>: warning: <problem>"``."""
    log.warning("%s: warning: %s", source, problem)


def check_regular_file(path: str | Path, what: str = "file") -> int:
    """The size of ``path``, after checking that it is a regular file (a FIFO would block the
    reader forever, a device would be read as voxels). Symbolic links are followed."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, f"no such {what}") from None
    except OSError as exc:
        raise InputError(path, f"cannot read it ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(path, f"is a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise InputError(path, f"is {kind}, not a regular {what}; refusing to read it")
    return st.st_size


# ------------------------------------------------------------------------------------- MetaImage


def read_metaimage_header(path: str | Path) -> tuple[dict[str, str], int]:
    """The ``key = value`` pairs of a MetaImage header up to ``ElementDataFile``, and the byte
    offset after that line (where an ``.mha``'s ``LOCAL`` data starts)."""
    path = Path(path)
    check_regular_file(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_PROBE)
    except OSError as exc:
        raise InputError(path, f"cannot read header ({exc.strerror})") from None
    header: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        end = len(head) if end < 0 else end
        line = head[pos:end]
        pos = end + 1
        if b"\0" in line:
            raise InputError(path, "not a MetaImage header: binary data (or UTF-16 text) before ElementDataFile")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(path, "not a MetaImage header: binary data before ElementDataFile") from None
        key, sep, value = text.partition("=")
        if not sep:
            if text.strip():
                raise InputError(path, f"not a MetaImage header: line {text.strip()[:40]!r} is not 'key = value'")
            continue
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return header, pos
    if not header:
        raise InputError(path, "not a MetaImage header (empty or no 'key = value' line)")
    return header, pos


def _ints(path: Path, h: dict, key: str, n: int | None = None) -> list[int]:
    words = h[key].split()
    if not words or not all(_INT.fullmatch(w) for w in words) or (n is not None and len(words) != n):
        count = f"{n} integer(s)" if n else "an integer"
        raise InputError(path, f"header field {key} = {h[key]!r}: expected {count}")
    return [int(w) for w in words]


def _floats(path: Path, h: dict, key: str, n: int) -> list[float]:
    words = h[key].split()
    try:
        values = [float(w) for w in words]
    except ValueError:
        values = []
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise InputError(path, f"header field {key} = {h[key]!r}: expected {n} finite numbers")
    return values


def _first_key(h: dict, *keys: str) -> str | None:
    return next((k for k in keys if k in h), None)


def check_metaimage(path: str | Path, *, allow_external_data: bool = False) -> None:
    """Check a ``.mhd``/``.mha`` header and its data before SimpleITK reads them.

    Args:
        path: the header (``.mhd``) or single file (``.mha``).
        allow_external_data: accept an ``ElementDataFile`` outside the header's folder (an absolute
            path, ``..``, a symbolic link leading out).

    Raises:
        InputError: see the module's docstring.
    """
    path = Path(path)
    h, data_offset = read_metaimage_header(path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in h:
            raise InputError(path, f"not a MetaImage header: no {key}")
    (ndims,) = _ints(path, h, "NDims", 1)
    if ndims != 3:
        raise InputError(path, f"{ndims}-D image (NDims = {ndims}); a CT volume is 3-D")
    dims = _ints(path, h, "DimSize", 3)
    if min(dims) < 1:
        raise InputError(path, f"DimSize = {h['DimSize']}: sizes must be positive")
    n_voxels = math.prod(dims)
    if n_voxels > MAX_VOXELS:
        raise InputError(path, f"DimSize = {h['DimSize']}: {n_voxels:.3g} voxels, more than any CT scan")
    etype = h["ElementType"]
    if etype not in MET_SIZES:
        raise InputError(path, f"unsupported ElementType {etype!r}; a CT volume needs one of {', '.join(MET_ACCEPTED)}")
    channels = _ints(path, h, "ElementNumberOfChannels", 1)[0] if "ElementNumberOfChannels" in h else 1
    if channels != 1:
        raise InputError(path, f"ElementNumberOfChannels = {channels}: a CT volume has one channel")
    if etype not in MET_ACCEPTED:
        raise InputError(path, f"unsupported ElementType {etype}: cannot hold HU (air is -1000); "
                               f"need one of {', '.join(MET_ACCEPTED)}")
    _check_metaimage_geometry(path, h)

    name = h["ElementDataFile"]
    if name.upper() == "LOCAL":
        data, present = path, check_regular_file(path) - data_offset
    else:
        data = _data_file(path, name, allow_external_data)
        present, data_offset = check_regular_file(data, "data file"), 0
    raw_bytes = n_voxels * MET_SIZES[etype]
    compressed = h.get("CompressedData", "False").strip().lower() == "true"
    header_size = _ints(path, h, "HeaderSize", 1)[0] if "HeaderSize" in h else 0
    if header_size < -1:
        raise InputError(path, f"HeaderSize = {header_size}: expected -1 (data at the end) or a byte count")
    what = f"DimSize {' x '.join(map(str, dims))} of {etype}"
    if compressed:
        declared = None
        if "CompressedDataSize" in h:
            (declared,) = _ints(path, h, "CompressedDataSize", 1)
            if declared < 1:
                raise InputError(path, f"CompressedDataSize = {declared}: expected a positive byte count")
            if declared != present:
                cut = "truncated" if declared > present else "longer than declared"
                raise InputError(path, f"data of {data.name} is {cut}: {present} bytes, "
                                       f"CompressedDataSize declares {declared}")
        _check_zlib(path, data, data_offset, declared or present, raw_bytes, what)
        return
    expected = raw_bytes + max(header_size, 0)
    if present < expected or (header_size != -1 and present > expected):
        cut = "truncated" if present < expected else "longer than declared"
        extra = f" + HeaderSize {header_size}" if header_size > 0 else ""
        raise InputError(path, f"data of {data.name} is {cut}: {present} bytes, {what}{extra} "
                               f"need {expected}")


def _check_metaimage_geometry(path: Path, h: dict) -> None:
    key = _first_key(h, "ElementSpacing", "ElementSize")
    if key is None:
        warn(path, "no ElementSpacing in the header: assuming 1 x 1 x 1 mm voxels")
    else:
        spacing = _floats(path, h, key, 3)
        if min(spacing) <= 0:
            raise InputError(path, f"{key} = {h[key]}: spacing must be positive")
    key = _first_key(h, "Offset", "Origin", "Position")
    if key is not None:
        _floats(path, h, key, 3)
    key = _first_key(h, "TransformMatrix", "Rotation", "Orientation")
    if key is not None:
        m = np.asarray(_floats(path, h, key, 9)).reshape(3, 3)
        if not np.allclose(m.T @ m, np.eye(3), atol=1e-3):
            raise InputError(path, f"{key} = {h[key]}: not a rotation (orthonormal) matrix")


def _data_file(header: Path, name: str, allow_external: bool) -> Path:
    if not name:
        raise InputError(header, "ElementDataFile is empty")
    if name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1:
        raise InputError(header, f"ElementDataFile = {name}: slice lists and file patterns are not supported; "
                                 f"convert the scan to one .mhd + .raw or an .mha")
    data = header.parent / name
    # the name is what a crafted header controls (../../etc/passwd): it must lead to the scan's
    # folder or below; a symbolic link placed there (a git-annex dataset) is the user's own doing
    lexical = os.path.normpath(name)
    if not allow_external and (Path(name).is_absolute() or lexical == os.pardir or lexical.startswith(os.pardir + os.sep)):
        raise InputError(header, f"ElementDataFile = {name} lies outside the scan's folder; refusing to "
                                 f"read it (allow it with --allow-external-data)")
    if not data.exists():
        raise InputError(header, f"data file {name} not found next to the header")
    try:
        check_regular_file(data, "data file")
    except InputError as exc:
        raise InputError(header, f"ElementDataFile = {name}: {exc.problem}") from None
    return data


def _check_zlib(header: Path, data: Path, offset: int, size: int, raw_bytes: int, what: str) -> None:
    """Inflate the data without keeping it: a cut or corrupt zlib stream is read by SimpleITK as
    zeros or noise. Stops as soon as the stream gives more than it should."""
    inflater = zlib.decompressobj()
    total, left = 0, size
    try:
        with open(data, "rb") as fh:
            fh.seek(offset)
            while left > 0 and not inflater.eof:
                chunk = fh.read(min(left, 1 << 22))
                if not chunk:
                    break
                left -= len(chunk)
                total += len(inflater.decompress(chunk, raw_bytes + 1 - total))
                while inflater.unconsumed_tail and total <= raw_bytes:
                    total += len(inflater.decompress(inflater.unconsumed_tail, raw_bytes + 1 - total))
                if total > raw_bytes:
                    break
        if total <= raw_bytes and inflater.eof is False:
            total += len(inflater.flush())
    except zlib.error as exc:
        raise InputError(header, f"data of {data.name} is corrupt ({exc})") from None
    except OSError as exc:
        raise InputError(header, f"cannot read {data.name} ({exc.strerror})") from None
    if total > raw_bytes:
        raise InputError(header, f"data of {data.name} inflates to more than the {raw_bytes} bytes of {what}")
    if not inflater.eof or total < raw_bytes:
        raise InputError(header, f"data of {data.name} is truncated: inflates to {total} bytes, {what} "
                                 f"need {raw_bytes}")


# ----------------------------------------------------------------------------------------- NIfTI

# NIfTI-1 datatype codes a CT volume can come in (signed, 16 bits or more) and the ones it cannot
_NIFTI_OK = {4: "int16", 8: "int32", 16: "float32", 64: "float64", 1024: "int64"}
_NIFTI_REFUSED = {2: "uint8", 256: "int8", 512: "uint16", 768: "uint32", 1280: "uint64",
                  128: "RGB", 2304: "RGBA", 32: "complex64", 1792: "complex128"}
_NIFTI_HEADER = 348


def check_nifti(path: str | Path) -> None:
    """Check a NIfTI-1 ``.nii``/``.nii.gz``: its header fields and that the voxels it declares
    are all there (a ``.nii.gz`` is read through to its CRC, output dropped)."""
    path = Path(path)
    size = check_regular_file(path)
    gz = path.name.lower().endswith(".gz")
    try:
        if gz:
            with gzip.open(path, "rb") as fh:
                hdr = fh.read(_NIFTI_HEADER)
                total = len(hdr)
                while chunk := fh.read(1 << 22):
                    total += len(chunk)
        else:
            with open(path, "rb") as fh:
                hdr = fh.read(_NIFTI_HEADER)
            total = size
    except (OSError, EOFError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InputError(path, f"truncated or corrupt gzip data ({reason})") from None
    if len(hdr) < _NIFTI_HEADER:
        raise InputError(path, f"{len(hdr)} bytes: too short for a NIfTI header ({_NIFTI_HEADER})")
    end = "<" if struct.unpack_from("<i", hdr, 0)[0] == _NIFTI_HEADER else ">"
    if struct.unpack_from(end + "i", hdr, 0)[0] != _NIFTI_HEADER:
        if struct.unpack_from("<i", hdr, 0)[0] == 540 or struct.unpack_from(">i", hdr, 0)[0] == 540:
            return  # NIfTI-2: SimpleITK checks its header itself
        raise InputError(path, "not a NIfTI-1 file (sizeof_hdr is not 348)")
    magic = hdr[344:348]
    if magic != b"n+1\0":
        raise InputError(path, f"NIfTI magic is {magic!r}, expected 'n+1' (a single-file .nii)")
    dim = struct.unpack_from(end + "8h", hdr, 40)
    if not 3 <= dim[0] <= 7:
        raise InputError(path, f"dim[0] = {dim[0]}: a CT volume is 3-D")
    shape = dim[1: dim[0] + 1]
    if min(shape) < 1:
        raise InputError(path, f"dimensions {tuple(shape)}: sizes must be positive")
    if len(shape) >= 5 and shape[4] > 1:
        raise InputError(path, f"{shape[4]}-component voxels (dimensions {tuple(shape)}); a CT volume has one")
    if any(d != 1 for d in shape[3:]):
        raise InputError(path, f"dimensions {tuple(shape)}: a CT volume is 3-D")
    datatype, bitpix = struct.unpack_from(end + "2h", hdr, 70)
    if datatype in _NIFTI_REFUSED:
        raise InputError(path, f"{_NIFTI_REFUSED[datatype]} voxels cannot hold HU (air is -1000)")
    if datatype not in _NIFTI_OK:
        raise InputError(path, f"unknown NIfTI datatype {datatype}")
    pixdim = struct.unpack_from(end + "8f", hdr, 76)
    if not all(math.isfinite(v) and v > 0 for v in pixdim[1:4]):
        raise InputError(path, f"pixdim {tuple(round(v, 4) for v in pixdim[1:4])}: voxel sizes must be positive "
                               f"and finite")
    vox_offset, slope, inter = struct.unpack_from(end + "3f", hdr, 108)
    if not math.isfinite(vox_offset) or vox_offset < _NIFTI_HEADER + 4:
        raise InputError(path, f"vox_offset {vox_offset}: expected at least 352")
    needed = int(vox_offset) + math.prod(shape[:3]) * np.dtype(_NIFTI_OK[datatype]).itemsize
    if total < needed:
        raise InputError(path, f"truncated: {total} bytes{' inflated' if gz else ''}, vox_offset {int(vox_offset)} "
                               f"+ {' x '.join(map(str, shape[:3]))} voxels of {_NIFTI_OK[datatype]} need {needed}")
    if math.isfinite(slope) and slope != 0:  # 0 or NaN: no scaling (NIfTI-1)
        _check_rescale(path, "scl_slope", "scl_inter", slope, inter)
    elif not math.isnan(slope) and slope != 0:
        raise InputError(path, f"scl_slope {slope}")
    qform, sform = struct.unpack_from(end + "2h", hdr, 252)
    quatern = struct.unpack_from(end + "6f", hdr, 256)
    srow = struct.unpack_from(end + "12f", hdr, 280)
    if qform > 0 and not all(math.isfinite(v) for v in quatern):
        raise InputError(path, "qform (quatern/qoffset) holds NaN or Inf")
    if sform > 0 and not all(math.isfinite(v) for v in srow):
        raise InputError(path, "sform (srow_x/y/z) holds NaN or Inf")


def _check_rescale(source, slope_name: str, inter_name: str, slope: float, inter: float) -> None:
    if not (math.isfinite(slope) and 0 < abs(slope) <= MAX_RESCALE_SLOPE):
        raise InputError(source, f"{slope_name} {slope:g}: a CT rescale slope is about 1 (at most "
                                 f"{MAX_RESCALE_SLOPE:g})")
    if not (math.isfinite(inter) and abs(inter) <= MAX_RESCALE_INTERCEPT):
        raise InputError(source, f"{inter_name} {inter:g}: a CT rescale intercept is about -1024 "
                                 f"(at most {MAX_RESCALE_INTERCEPT:g} in size)")


# ----------------------------------------------------------------------------------------- DICOM

_DICOM_TAGS = ["Modality", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
               "RescaleIntercept", "BitsAllocated", "SamplesPerPixel", "Rows", "Columns"]
# transfer syntaxes whose pixel data is stored as is: its size is known from the header
_DICOM_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _numbers(value) -> list[float] | None:
    try:
        values = [float(v) for v in ([value] if isinstance(value, (str, int, float)) else list(value))]
    except (TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def check_dicom_headers(folder: Path, names) -> None:
    """Check the headers of a DICOM series' files (pydicom, pixels not read).

    Raises:
        InputError: an unreadable header, Modality other than CT, a missing or broken position,
            orientation or pixel spacing, pixels of fewer than 16 bits, an absurd rescale.
    """
    import pydicom

    modalities, no_position, no_orientation = set(), [], []
    for name in names:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
            raise InputError(name, f"unreadable DICOM header ({type(exc).__name__})") from None
        modalities.add(str(ds.get("Modality", "")).strip() or "missing")
        if "ImagePositionPatient" not in ds:
            no_position.append(name)
        elif _numbers(ds.ImagePositionPatient) is None or len(ds.ImagePositionPatient) != 3:
            raise InputError(name, f"ImagePositionPatient (0020,0032) is {ds.ImagePositionPatient!r}")
        if "ImageOrientationPatient" not in ds:
            no_orientation.append(name)
        else:
            iop = _numbers(ds.ImageOrientationPatient)
            if iop is None or len(iop) != 6 or not (
                    abs(np.linalg.norm(iop[:3]) - 1) < 1e-2 and abs(np.linalg.norm(iop[3:]) - 1) < 1e-2):
                raise InputError(name, f"ImageOrientationPatient (0020,0037) is {ds.ImageOrientationPatient!r}: "
                                       f"not two unit vectors")
        spacing = _numbers(ds.get("PixelSpacing")) if "PixelSpacing" in ds else None
        if "PixelSpacing" not in ds:
            raise InputError(name, "no PixelSpacing (0028,0030): the pixel size is unknown")
        if spacing is None or len(spacing) != 2 or min(spacing) <= 0:
            raise InputError(name, f"PixelSpacing (0028,0030) is {ds.PixelSpacing!r}: must be two positive numbers")
        bits = ds.get("BitsAllocated")
        if bits is not None and int(bits) < 16:
            raise InputError(name, f"{int(bits)}-bit pixels cannot hold HU (air is -1000)")
        syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
        if bits and syntax in _DICOM_UNCOMPRESSED:
            needed = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(bits) // 8
            if os.path.getsize(name) < needed:
                raise InputError(name, f"truncated: {os.path.getsize(name)} bytes, its {ds.Rows} x {ds.Columns} "
                                       f"pixels need {needed}")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputError(name, f"{ds.SamplesPerPixel} samples per pixel: a CT image has one")
        slope = _numbers(ds.get("RescaleSlope", 1.0))
        inter = _numbers(ds.get("RescaleIntercept", 0.0))
        _check_rescale(name, "RescaleSlope (0028,1053)", "RescaleIntercept (0028,1052)",
                       slope[0] if slope else math.nan, inter[0] if inter else math.nan)
    if modalities != {"CT"}:
        raise InputError(folder, f"DICOM Modality (0008,0060) is {'/'.join(sorted(modalities))}, not CT")
    if no_position:
        raise InputError(folder, f"{len(no_position)} of {len(names)} file(s) have no ImagePositionPatient "
                                 f"(0020,0032), e.g. {Path(no_position[0]).name}: slice order and z spacing "
                                 f"are unknown")
    if no_orientation:
        warn(folder, "no ImageOrientationPatient (0020,0037): assuming axial slices (identity direction)")


# ------------------------------------------------------------------------------------------ values


def check_hu(path: str | Path, arr: np.ndarray) -> None:
    """Refuse a volume whose values are not CT Hounsfield units: constant, or mostly outside
    [-1100, 4000] HU (wrong byte order, wrong type, an absurd rescale, random bytes)."""
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(path, f"every voxel is {lo:g}: not a CT image")
    sample = arr.reshape(-1)[:: max(1, arr.size // 1_000_000)]
    inside = float(np.mean((sample >= CT_HU_RANGE[0]) & (sample <= CT_HU_RANGE[1])))
    if inside < MIN_CT_LIKE_SHARE:
        raise InputError(path, f"values are not CT HU: only {inside:.0%} of voxels lie in "
                               f"[{CT_HU_RANGE[0]:g}, {CT_HU_RANGE[1]:g}] (range {lo:.4g} to {hi:.4g}); wrong "
                               f"byte order, pixel type or rescale?")
