"""Hostile and broken input, generated at test time: every case must end in one clean line.

Each case builds a malformed input (a crop of the real samples or of a synthetic phantom with one
thing broken, a bad table, a bad option value) in its own folder and runs the CLI on it. The
outcome is one of:

- ``clean``: a non-zero exit and exactly one line on stderr, naming the file (or the option);
- ``warning``: exit 0 with a named warning line, for the cases where a loud warning is enough;
- ``noisy``: the right error, but buried in more lines (ITK warnings, torch text);
- ``traceback``: an exception escaped;
- ``accepted``: exit 0 without a word, on garbage;
- ``crash``: the process died (a segmentation fault in a reader);
- ``hang``: no answer within the timeout;
- ``lost``: the previous results in the output folder were changed by a run that failed.

The CLI runs in a child forked from a server process that imported everything once
(``nodulekit.cli.main``, no new interpreter per case) with file descriptors 1 and 2 redirected, so that the library noise written by C++ code is
caught too and a reader that crashes or hangs takes only its case down; the cases that need a
fresh process (a FIFO that blocks) spawn one. ``scripts/fuzz_report.py`` prints the counts table.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("NODULEKIT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
OUTCOMES = ("clean", "warning", "noisy", "traceback", "crash", "accepted", "hang", "lost")
TIMEOUT_S = 60


# --------------------------------------------------------------------------------------- assets


@dataclass
class Assets:
    """Valid inputs every case starts from (built once)."""

    root: Path
    scans: dict[str, Path] = field(default_factory=dict)  # variant -> a valid scan file or folder
    seg: Path | None = None
    cls: Path | None = None
    tables: Path | None = None  # folder with detections.csv, annotations.csv, excluded.csv, seriesuids.csv


def _phantom_image():
    """A small synthetic chest: body, two lungs and a nodule, 12 slices of 96 x 96."""
    import SimpleITK as sitk

    shape = (12, 96, 96)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    y, x = y[0], x[0]
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[:, ((y - 48) / 40.0) ** 2 + ((x - 48) / 44.0) ** 2 <= 1] = 40
    for cx in (30, 66):
        hu[:, ((y - 48) / 30.0) ** 2 + ((x - cx) / 14.0) ** 2 <= 1] = -850
    hu[((z - 6) * 3.0) ** 2 + ((y[None] - 50) * 2.0) ** 2 + ((x[None] - 30) * 2.0) ** 2 <= 16] = 0
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing((2.0, 2.0, 3.0))
    img.SetOrigin((-96.0, -96.0, -18.0))
    return img


def _cptac_image():
    """A crop of the real CPTAC scan: 12 slices, every 4th voxel in-plane (128 x 128)."""
    import SimpleITK as sitk

    mhds = sorted((REAL_DATA / "CPTAC-LSCC_C3N-00247").glob("*.mhd"))
    if not mhds:
        return None
    img = sitk.ReadImage(str(mhds[0]))
    return img[::4, ::4, 44:56]


def _small_dicom(dst: Path) -> Path | None:
    """The real LIDC DICOM series with every 4th pixel in-plane (128 x 128 slices)."""
    import pydicom

    files = sorted((REAL_DATA / "LIDC-IDRI-0002_dicom").glob("*.dcm"))
    if not files:
        return None
    dst.mkdir(parents=True)
    for f in files:
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array[::4, ::4].copy()
        ds.Rows, ds.Columns = arr.shape
        ds.PixelSpacing = [float(v) * 4 for v in ds.PixelSpacing]
        ds.PixelData = arr.tobytes()
        ds.save_as(dst / f.name)
    return dst


def fast_models(folder: Path) -> tuple[Path, Path]:
    """Untrained checkpoints whose segmentation marks every lung pixel: one candidate per lung,
    so that a detect run takes seconds."""
    import torch

    from nodulekit.models.checkpoint import save_cls_checkpoint, save_seg_checkpoint
    from nodulekit.models.classifier import LunaModel
    from nodulekit.models.unet import SegModel

    torch.manual_seed(0)
    cls = LunaModel()
    torch.nn.init.normal_(cls.head_linear.weight, std=0.05)
    seg = SegModel()
    with torch.no_grad():
        seg.unet.last.weight.zero_()
        seg.unet.last.bias.fill_(10.0)
    return save_seg_checkpoint(folder / "seg.pt", seg), save_cls_checkpoint(folder / "cls.pt", cls)


def build_assets(root: Path) -> Assets:
    import SimpleITK as sitk

    a = Assets(root)
    images = {"phantom": _phantom_image()}
    real = _cptac_image()
    if real is not None:
        images["cptac"] = real
    for name, img in images.items():
        for variant, fname, compress in (("raw", "scan.mhd", False), ("zraw", "scan.mhd", True),
                                         ("mha", "scan.mha", False), ("nii", "scan.nii", False),
                                         ("niigz", "scan.nii.gz", True)):
            folder = root / f"{name}-{variant}"
            folder.mkdir(parents=True)
            sitk.WriteImage(img, str(folder / fname), useCompression=compress and variant == "zraw")
            a.scans[f"{name}-{variant}"] = folder / fname
    dicom = _small_dicom(root / "dicom")
    if dicom is not None:
        a.scans["dicom"] = dicom

    a.seg, a.cls = fast_models(root / "models")

    t = root / "tables"
    t.mkdir()
    (t / "detections.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,probability\n"
        "s1,10.0,10.0,10.0,0.9\ns1,50.0,50.0,50.0,0.4\ns2,0.0,0.0,0.0,0.2\n")
    (t / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,10.0,10.0,10.0,6.0\ns2,30.0,30.0,30.0,8.0\n")
    (t / "excluded.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,-40.0,0.0,0.0,-1\n")
    (t / "seriesuids.csv").write_text("s1\ns2\ns3\n")
    a.tables = t
    return a


# ---------------------------------------------------------------------------------------- cases


@dataclass
class Run:
    argv: list[str]
    name: str  # what the one error line must mention (a file name, an option)
    keep: Path | None = None  # an output folder whose earlier results must survive a failed run
    subprocess: bool = False


@dataclass
class Case:
    id: str
    command: str
    build: Callable[[Path, Assets], Run]
    expect: str = "error"  # "error", "warn" (exit 0 with a named warning), "either"
    needs: str = ""  # the asset it needs ("" or a key of Assets.scans)
    xfail: str | None = None


def _copy_scan(a: Assets, variant: str, d: Path) -> Path:
    src = a.scans[variant]
    if src.is_dir():
        dst = d / "series"
        shutil.copytree(src, dst)
        return dst
    dst_dir = d / "scan"
    shutil.copytree(src.parent, dst_dir)
    return dst_dir / src.name


def _split_mha(path: Path) -> tuple[list[str], bytes]:
    raw = path.read_bytes()
    if path.suffix == ".mhd":
        return raw.decode("latin-1").splitlines(), b""
    lines, pos = [], 0
    while pos < len(raw):
        end = raw.index(b"\n", pos)
        line = raw[pos:end].decode("latin-1")
        lines.append(line)
        pos = end + 1
        if line.startswith("ElementDataFile"):
            break
    return lines, raw[pos:]


def _edit_header(path: Path, changes: dict[str, str | None]) -> None:
    """Set (or, with None, remove) MetaImage header keys, keeping ElementDataFile last."""
    lines, data = _split_mha(path)
    keys = [ln.split("=", 1)[0].strip() for ln in lines]
    out = []
    for key, line in zip(keys, lines):
        if key in changes:
            if changes[key] is not None:
                out.append(f"{key} = {changes[key]}")
        else:
            out.append(line)
    for key, value in changes.items():
        if key not in keys and value is not None:
            out.insert(len(out) - 1, f"{key} = {value}")
    path.write_bytes(("\n".join(out) + "\n").encode("latin-1") + data)


def _data_file(header: Path) -> Path:
    for line in _split_mha(header)[0]:
        if line.startswith("ElementDataFile"):
            return header.parent / line.split("=", 1)[1].strip()
    raise AssertionError("no ElementDataFile")


def _info(path: Path, *extra: str) -> Run:
    return Run(["info", str(path), *extra], path.name)


def _header_case(variant: str, changes: dict, expect: str = "error", cmd: str = "info"):
    def build(d: Path, a: Assets) -> Run:
        p = _copy_scan(a, variant, d)
        _edit_header(p, changes)
        return _run_on(cmd, p, d, a)

    return build


def _data_case(variant: str, mutate: Callable[[Path, Path], None], cmd: str = "info"):
    """``mutate(header, data_file)`` breaks the data of a MetaImage."""

    def build(d: Path, a: Assets) -> Run:
        p = _copy_scan(a, variant, d)
        mutate(p, p if p.suffix == ".mha" else _data_file(p))
        return _run_on(cmd, p, d, a)

    return build


def _previous_results(out: Path) -> Path:
    """An output folder holding an earlier run's results, which a failed run must leave alone."""
    (out / "png").mkdir(parents=True)
    (out / "nodules.csv").write_text("seriesuid,coordX,coordY,coordZ,probability,diameter_mm\n"
                                     + "".join(f"old,{k}.0,0.0,0.0,0.9,5.00\n" for k in range(353)))
    (out / "nodules.json").write_text(json.dumps({"scans_ok": 1, "scans": [{"seriesuid": "old"}]}))
    (out / "png" / "old_0.png").write_bytes(b"\x89PNG old")
    return out


def _detect(a: Assets, inputs: list[str], out: Path, *extra: str, name: str, keep: bool = True) -> Run:
    if keep:
        _previous_results(out)
    argv = ["detect", *inputs, "--seg", str(a.seg), "--cls", str(a.cls), "--out", str(out),
            "--no-progress", "--no-png", *extra]
    return Run(argv, name, keep=out if keep else None)


def _run_on(cmd: str, p: Path, d: Path, a: Assets) -> Run:
    if cmd == "info":
        return _info(p)
    return _detect(a, [str(p)], d / "out", name=p.name)


def _truncate(fraction: float):
    def mutate(header: Path, data: Path) -> None:
        raw = data.read_bytes()
        data.write_bytes(raw[: int(len(raw) * fraction)])

    return mutate


def _append(n: int):
    def mutate(header: Path, data: Path) -> None:
        with open(data, "ab") as fh:
            fh.write(b"\0" * n)

    return mutate


def _flip_middle(header: Path, data: Path) -> None:
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 64] = bytes((b ^ 0x5A) for b in raw[mid: mid + 64])
    data.write_bytes(bytes(raw))


def _voxels(fill):
    """Replace the voxels of an uncompressed MetaImage (.mhd + .raw or .mha) by ``fill(n)`` int16."""

    def mutate(header: Path, data: Path) -> None:
        lines, _ = _split_mha(header)
        dims = [int(v) for ln in lines if ln.startswith("DimSize") for v in ln.split("=")[1].split()]
        body = np.asarray(fill(int(np.prod(dims))), dtype="<i2").tobytes()
        if header.suffix == ".mha":
            header.write_bytes(header.read_bytes()[: header.stat().st_size - len(body)] + body)
        else:
            data.write_bytes(body)

    return mutate


def _random_bytes(header: Path, data: Path) -> None:
    rng = np.random.default_rng(1)
    if header.suffix == ".mha":
        lines, body = _split_mha(header)
        header.write_bytes(("\n".join(lines) + "\n").encode() + rng.bytes(len(body)))
    else:
        data.write_bytes(rng.bytes(data.stat().st_size))


def _byteswap(header: Path, data: Path) -> None:
    lines, body = _split_mha(header)
    if header.suffix == ".mha":
        header.write_bytes(("\n".join(lines) + "\n").encode() + np.frombuffer(body, "<i2").byteswap().tobytes())
    else:
        data.write_bytes(np.frombuffer(data.read_bytes(), "<i2").byteswap().tobytes())


# header field -> values that must each be refused (None: the field removed)
_BAD_HEADER_VALUES = {
    "NDims": ("three", "2", "4", "-3", "3.5", None),
    "DimSize": ("a b c", "64 64", "0 64 12", "-64 64 12", "64.5 64 12", "512 512 1500", "99999999 99999999 99999999",
                None),
    "ElementType": ("MET_UCHAR", "MET_CHAR", "MET_USHORT", "MET_FOO", "", "MET_DOUBLE"),
    "ElementNumberOfChannels": ("x", "3", "-1", "0", "1.5"),
    "HeaderSize": ("x", "99999999", "-5", "1.5"),
    "ElementSpacing": ("0 0 0", "nan 1 1", "inf 1 1", "a b c", "1 1", "-1 1 1"),
    "Offset": ("nan 0 0", "inf 0 0", "a b c", "1 2"),
    "TransformMatrix": ("1 0 0 0 1 0 0 0 0", "a b c d e f g h i", "nan 0 0 0 1 0 0 0 1", "1 0 0", "2 0 0 0 2 0 0 0 2"),
    "BinaryDataByteOrderMSB": ("True",),
}


def _mutation_id(changes: dict) -> str:
    return ",".join(f"{k}={'(none)' if v is None else v.replace(' ', '_')}" for k, v in changes.items())


HEADER_MUTATIONS: list[tuple[str, dict, str]] = [
    (_mutation_id({key: value}), {key: value}, "error") for key, values in _BAD_HEADER_VALUES.items() for value in values
] + [("spacing-missing", {"ElementSpacing": None, "ElementSize": None}, "either")]
MHD_ONLY_MUTATIONS: list[tuple[str, dict, str]] = [
    ("datafile-passwd", {"ElementDataFile": "../../../../../../etc/passwd"}, "error"),
    ("datafile-absolute", {"ElementDataFile": "/etc/passwd"}, "error"),
    ("datafile-missing", {"ElementDataFile": "nothere.raw"}, "error"),
    ("datafile-empty", {"ElementDataFile": ""}, "error"),
    ("datafile-list", {"ElementDataFile": "LIST"}, "error"),
    ("datafile-dot", {"ElementDataFile": "."}, "error"),
    ("datafile-pattern", {"ElementDataFile": "slice%03d.raw 1 12 1"}, "error"),
    ("datafile-dev-zero", {"ElementDataFile": "/dev/zero"}, "error"),
]
RAW_MUTATIONS = [("compressed-true", {"CompressedData": "True"}, "error"),
                 ("compressed-size-on-raw", {"CompressedData": "True", "CompressedDataSize": "100"}, "error")]
ZRAW_MUTATIONS = [
    ("compressed-false", {"CompressedData": "False", "CompressedDataSize": None}, "error"),
    ("csize-text", {"CompressedDataSize": "x"}, "error"),
    ("csize-neg", {"CompressedDataSize": "-1"}, "error"),
    ("csize-huge", {"CompressedDataSize": "99999999999"}, "error"),
    ("csize-float", {"CompressedDataSize": "1.5e3"}, "error"),
    ("csize-1500-slices", {"DimSize": "128 128 1500"}, "error"),
]
DATA_MUTATIONS = [
    ("truncated-half", _truncate(0.5)),
    ("truncated-empty", _truncate(0.0)),
    ("truncated-one-byte", _truncate(0.9999)),
    ("trailing-bytes", _append(4096)),
    ("random-bytes", _random_bytes),
]
VALUE_MUTATIONS = [
    ("all-zero", _voxels(lambda n: np.zeros(n))),
    ("constant-30000", _voxels(lambda n: np.full(n, 30000))),
    ("uniform-garbage", _voxels(lambda n: np.random.default_rng(0).integers(-32768, 32767, n))),
    ("big-endian-unflagged", _byteswap),
]


def _write_bytes(content: bytes, name: str):
    def build(d: Path, a: Assets) -> Run:
        p = d / name
        p.write_bytes(content)
        return _info(p)

    return build


def _nifti_field(fmt: str, offset: int, value, variant: str = "nii", cmd: str = "info"):
    def build(d: Path, a: Assets) -> Run:
        p = _copy_scan(a, f"phantom-{variant}", d)
        raw = bytearray(gzip.decompress(p.read_bytes()) if variant == "niigz" else p.read_bytes())
        struct.pack_into(fmt, raw, offset, *(value if isinstance(value, tuple) else (value,)))
        p.write_bytes(gzip.compress(bytes(raw)) if variant == "niigz" else bytes(raw))
        return _run_on(cmd, p, d, a)

    return build


def _nifti_cut(keep: Callable[[int], int], variant: str = "niigz"):
    def build(d: Path, a: Assets) -> Run:
        p = _copy_scan(a, f"phantom-{variant}", d)
        raw = p.read_bytes()
        p.write_bytes(raw[: keep(len(raw))])
        return _info(p)

    return build


def _nifti_flip(d: Path, a: Assets) -> Run:
    p = _copy_scan(a, "phantom-niigz", d)
    raw = bytearray(p.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 32] = bytes(b ^ 0xFF for b in raw[mid: mid + 32])
    p.write_bytes(bytes(raw))
    return _info(p)


def _nifti_header_only(d: Path, a: Assets) -> Run:
    p = _copy_scan(a, "phantom-nii", d)
    p.write_bytes(p.read_bytes()[:352])
    return _info(p)


def _dicom_case(mutate: Callable, files: str = "all", cmd: str = "info"):
    """``mutate(ds)`` on every file of the small DICOM series (or on the ``"one"`` in the middle)."""

    def build(d: Path, a: Assets) -> Run:
        import pydicom

        folder = _copy_scan(a, "dicom", d)
        names = sorted(folder.iterdir())
        chosen = names if files == "all" else [names[len(names) // 2]]
        for f in chosen:
            ds = pydicom.dcmread(f)
            if mutate(ds) is not False:
                ds.save_as(f)
        return _run_on(cmd, folder, d, a)

    return build


def _dicom_files(mutate: Callable[[Path, list[Path]], None]):
    def build(d: Path, a: Assets) -> Run:
        folder = _copy_scan(a, "dicom", d)
        mutate(folder, sorted(folder.iterdir()))
        return _info(folder)

    return build


def _del(*tags):
    def mutate(ds):
        for t in tags:
            if t in ds:
                delattr(ds, t)

    return mutate


def _set(**values):
    def mutate(ds):
        for k, v in values.items():
            setattr(ds, k, v)

    return mutate


def _eight_bit(ds):
    arr = np.clip(ds.pixel_array // 16, 0, 255).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()


def _big_endian_pixels(ds):
    ds.PixelData = np.frombuffer(ds.PixelData, "<i2").byteswap().tobytes()


def _dicom_duplicate_slice(folder: Path, names: list[Path]) -> None:
    shutil.copy(names[3], folder / "dup.dcm")
    import pydicom

    ds = pydicom.dcmread(folder / "dup.dcm")
    ds.SOPInstanceUID = ds.SOPInstanceUID[:-1] + ("1" if ds.SOPInstanceUID[-1] != "1" else "2")
    ds.save_as(folder / "dup.dcm")


TABLES = ("detections", "annotations", "excluded", "seriesuids")


def _evaluate(d: Path, a: Assets, *extra: str, tables: dict[str, Path] | None = None, out: Path | None = None):
    t = {k: a.tables / f"{k}.csv" for k in TABLES}
    t.update(tables or {})
    argv = ["evaluate", "--detections", str(t["detections"]), "--annotations", str(t["annotations"]),
            "--excluded", str(t["excluded"]), "--seriesuids", str(t["seriesuids"]),
            "--out", str(out or d / "out"), "--bootstrap", "10", *extra]
    return argv


def _table_case(table: str, content: bytes | Callable[[str], bytes]):
    def build(d: Path, a: Assets) -> Run:
        p = d / f"{table}.csv"
        base = (a.tables / f"{table}.csv").read_text()
        p.write_bytes(content(base) if callable(content) else content)
        return Run(_evaluate(d, a, tables={table: p}), p.name)

    return build


def _option_case(make_argv: Callable[[Path, Assets], list[str]], name: str, keep: str | None = None):
    def build(d: Path, a: Assets) -> Run:
        argv = make_argv(d, a)
        return Run(argv, name, keep=d / keep if keep else None)

    return build


def _detect_option(option: str, value: str):
    def make(d: Path, a: Assets) -> list[str]:
        scan = a.scans["phantom-raw"]
        return _detect(a, [str(scan)], d / "out", option, value, name=option).argv

    return _option_case(make, option, keep="out")


def _evaluate_option(option: str, value: str):
    return _option_case(lambda d, a: _evaluate(d, a, option, value), option)


def _synth_option(*args: str, name: str):
    return _option_case(lambda d, a: ["synth", "--out", str(d / "synth"), "--scans", "1", "--size", "64",
                                      "--max-slices", "8", "--no-progress", *args], name)


def _file_in(d: Path) -> Path:
    f = d / "afile.txt"
    f.write_text("precious\n")
    return f


def _crafted_checkpoint(which: str, edit: Callable[[dict], object]):
    """A copy of the test checkpoint ``which`` ("seg"/"cls") with ``edit(ckpt)`` applied."""

    def build(d: Path, a: Assets) -> Run:
        import torch

        src = a.seg if which == "seg" else a.cls
        ckpt = torch.load(src, weights_only=True)
        result = edit(ckpt)
        p = d / f"crafted_{which}.pt"
        torch.save(ckpt if result is None else result, p)
        seg, cls = (p, a.cls) if which == "seg" else (a.seg, p)
        run = _detect(a, [str(a.scans["phantom-raw"])], d / "out", name=p.name)
        run.argv[run.argv.index("--seg") + 1] = str(seg)
        run.argv[run.argv.index("--cls") + 1] = str(cls)
        return run

    return build


def _nan_weights(ckpt):
    for k, v in ckpt["model_state"].items():
        if v.is_floating_point():
            v.fill_(float("nan"))


def _malicious(ckpt):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ckpt["payload"] = Evil()


def _seg_as_cls(d: Path, a: Assets) -> Run:
    run = _detect(a, [str(a.scans["phantom-raw"])], d / "out", name=a.seg.name)
    run.argv[run.argv.index("--cls") + 1] = str(a.seg)
    return run


def _detect_batch(kind: str):
    """Two inputs: ``dup`` two slab.mhd in different folders (warning, unique ids); ``mixed`` one good
    and one broken scan (the good one's results written, exit non-zero)."""

    def build(d: Path, a: Assets) -> Run:
        src = a.scans["phantom-raw"]
        paths = []
        for sub in ("a", "b"):
            (d / sub).mkdir()
            shutil.copy(src, d / sub / "slab.mhd")
            shutil.copy(_data_file(src), d / sub / _data_file(src).name)
            paths.append(d / sub / "slab.mhd")
        if kind == "mixed":
            _truncate(0.5)(paths[1], _data_file(paths[1]))
        return _detect(a, [str(p) for p in paths], d / "out", name="slab.mhd", keep=False)

    return build


def _fifo_data(d: Path, a: Assets) -> Run:
    p = _copy_scan(a, "phantom-raw", d)
    fifo = p.parent / "fifo.raw"
    os.mkfifo(fifo)
    _edit_header(p, {"ElementDataFile": "fifo.raw"})
    return Run(["info", str(p)], p.name, subprocess=True)


def _fifo_scan(d: Path, a: Assets) -> Run:
    p = d / "pipe.mhd"
    os.mkfifo(p)
    return Run(["info", str(p)], p.name, subprocess=True)


def _out_under_file(command: str):
    def build(d: Path, a: Assets) -> Run:
        f = _file_in(d)
        if command == "detect":
            argv = _detect(a, [str(a.scans["phantom-raw"])], f / "sub", name=f.name, keep=False).argv
        elif command == "evaluate":
            argv = _evaluate(d, a, out=f / "sub")
        else:
            argv = ["synth", "--out", str(f / "sub"), "--scans", "1", "--size", "64", "--max-slices", "8",
                    "--no-progress"]
        return Run(argv, f.name)

    return build


def _out_is_file(command: str):
    def build(d: Path, a: Assets) -> Run:
        f = _file_in(d)
        if command == "detect":
            argv = _detect(a, [str(a.scans["phantom-raw"])], f, name=f.name, keep=False).argv
        elif command == "evaluate":
            argv = _evaluate(d, a, out=f)
        else:
            argv = ["synth", "--out", str(f), "--scans", "1", "--size", "64", "--max-slices", "8", "--no-progress"]
        return Run(argv, f.name)

    return build


def _bench(*extra: str, name: str):
    def build(d: Path, a: Assets) -> Run:
        import torch

        onnx = d / "tiny.onnx"
        torch.onnx.export(torch.nn.Conv2d(7, 1, 1), (torch.zeros(1, 7, 16, 16),), str(onnx), dynamo=False)
        return Run(["bench", str(onnx), "--runs", "1", "--warmup", "0", "--size", "16", *extra], name)

    return build


def _export(make_ckpt: Callable[[Path, Assets], Path], out: Callable[[Path], Path], name: str, *extra: str):
    def build(d: Path, a: Assets) -> Run:
        ckpt = make_ckpt(d, a)
        target = out(d)
        return Run(["export", str(ckpt), "--out", str(target), *extra], name, keep=None)

    return build


def _crafted_seg_file(edit: Callable[[dict], None]):
    def make(d: Path, a: Assets) -> Path:
        import torch

        ckpt = torch.load(a.seg, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, d / "crafted.pt")
        return d / "crafted.pt"

    return make


def cases() -> list[Case]:
    out: list[Case] = []
    add = out.append
    # every header mutation on a crop of the real scan (on the phantom where the real data is
    # missing); data and value mutations on both
    primary = "cptac" if (REAL_DATA / "CPTAC-LSCC_C3N-00247").is_dir() else "phantom"
    for source in ("cptac", "phantom"):
        for variant in ("raw", "zraw", "mha"):
            scan = f"{source}-{variant}"
            muts = HEADER_MUTATIONS + (MHD_ONLY_MUTATIONS if variant != "mha" else [])
            muts = muts + (RAW_MUTATIONS if variant == "raw" else ZRAW_MUTATIONS if variant == "zraw" else [])
            if variant == "mha":
                muts = muts + [("mha-1500-slices", {"DimSize": "128 128 1500"}, "error"),
                               ("mha-headersize-big", {"HeaderSize": "4096"}, "error")]
            for name, changes, expect in muts if source == primary else []:
                add(Case(f"info-{scan}-{name}", "info", _header_case(scan, changes), expect, needs=scan))
            for name, mutate in DATA_MUTATIONS + ([("corrupt-zlib", _flip_middle)] if variant == "zraw" else []):
                add(Case(f"info-{scan}-{name}", "info", _data_case(scan, mutate), needs=scan))
            if variant != "zraw":
                for name, mutate in VALUE_MUTATIONS:
                    add(Case(f"info-{scan}-{name}", "info", _data_case(scan, mutate), needs=scan))
    # the same breakage through detect: the batch must report it, and the earlier results survive
    for name, changes in (("channels-text", {"ElementNumberOfChannels": "x"}), ("headersize-text", {"HeaderSize": "x"}),
                          ("csize-text", {"CompressedDataSize": "x"}), ("offset-nan", {"Offset": "nan 0 0"}),
                          ("spacing-zero", {"ElementSpacing": "0 0 0"}), ("dimsize-1500", {"DimSize": "96 96 1500"}),
                          ("passwd", {"ElementDataFile": "../../../../../../etc/passwd"})):
        add(Case(f"detect-phantom-zraw-{name}", "detect", _header_case("phantom-zraw", changes, cmd="detect"),
                 needs="phantom-zraw"))
    for name, mutate in (("truncated", _truncate(0.5)), ("garbage", _voxels(lambda n: np.random.default_rng(0)
                                                                              .integers(-32768, 32767, n)))):
        add(Case(f"detect-phantom-raw-{name}", "detect", _data_case("phantom-raw", mutate, cmd="detect"),
                 needs="phantom-raw"))
    add(Case("detect-phantom-zraw-corrupt-zlib", "detect", _data_case("phantom-zraw", _flip_middle, cmd="detect"),
             needs="phantom-zraw"))

    # NIfTI: dim at 40 (8 x int16), datatype 70, bitpix 72, pixdim 76 (8 x float32), vox_offset 108, scl 112/116
    nifti = [
        ("neg-dim", "<h", 42, -96), ("dim0-2", "<h", 40, 2), ("dim0-0", "<h", 40, 0), ("dim0-8", "<h", 40, 8),
        ("dim-zero", "<h", 46, 0), ("dim-huge", "<h", 46, 32000), ("pixdim-zero", "<f", 80, 0.0),
        ("pixdim-nan", "<f", 80, float("nan")), ("pixdim-inf", "<f", 84, float("inf")), ("pixdim-neg-z", "<f", 88, -3.0),
        ("vox-offset-past-end", "<f", 108, 1e9), ("vox-offset-neg", "<f", 108, -500.0),
        ("slope-huge", "<f", 112, 1e30), ("slope-inf", "<f", 112, float("inf")), ("inter-huge", "<f", 116, 1e30),
        ("datatype-uint8", "<hh", 70, (2, 8)), ("datatype-rgb", "<hh", 70, (128, 24)), ("datatype-bogus", "<hh", 70, (999, 16)),
        ("sizeof-hdr", "<i", 0, 123), ("magic", "4s", 344, b"xx1\0"),
        ("qform-nan", "<f", 280, float("nan")), ("srow-nan", "<f", 292, float("nan")),
    ]
    for name, fmt, off, value in nifti:
        add(Case(f"info-nii-{name}", "info", _nifti_field(fmt, off, value), needs="phantom-nii"))
    for name, fmt, off, value in nifti[:6] + nifti[10:15]:
        add(Case(f"info-niigz-{name}", "info", _nifti_field(fmt, off, value, "niigz"), needs="phantom-niigz"))
    add(Case("detect-nii-pixdim-nan", "detect", _nifti_field("<f", 80, float("nan"), cmd="detect"), needs="phantom-nii"))
    add(Case("info-niigz-truncated-half", "info", _nifti_cut(lambda n: n // 2), needs="phantom-niigz"))
    add(Case("info-niigz-truncated-tail", "info", _nifti_cut(lambda n: n - 9), needs="phantom-niigz"))
    add(Case("info-niigz-only-header", "info", _nifti_cut(lambda n: 200), needs="phantom-niigz"))
    add(Case("info-niigz-corrupt", "info", _nifti_flip, needs="phantom-niigz"))
    add(Case("info-nii-header-only", "info", _nifti_header_only, needs="phantom-nii"))
    add(Case("info-nii-truncated", "info", _nifti_cut(lambda n: n // 2, "nii"), needs="phantom-nii"))
    add(Case("info-nii-empty", "info", _write_bytes(b"", "empty.nii")))
    add(Case("info-nii-random", "info", _write_bytes(np.random.default_rng(2).bytes(5000), "random.nii")))
    add(Case("info-niigz-not-gzip", "info", _write_bytes(b"plain text, not gzip\n" * 40, "text.nii.gz")))
    add(Case("info-niigz-gzip-of-text", "info", _write_bytes(gzip.compress(b"hello" * 100), "hello.nii.gz")))

    # DICOM
    dicom = [
        ("no-position", _dicom_case(_del("ImagePositionPatient")), "either"),
        ("no-position-one", _dicom_case(_del("ImagePositionPatient"), files="one"), "either"),
        ("no-orientation", _dicom_case(_del("ImageOrientationPatient")), "either"),
        ("orientation-zero", _dicom_case(_set(ImageOrientationPatient=[0, 0, 0, 0, 0, 0])), "error"),
        ("pixelspacing-zero", _dicom_case(_set(PixelSpacing=[0, 0])), "error"),
        ("pixelspacing-missing", _dicom_case(_del("PixelSpacing")), "either"),
        ("pixelspacing-neg", _dicom_case(_set(PixelSpacing=[-0.7, 0.7])), "error"),
        ("slope-huge", _dicom_case(_set(RescaleSlope=1e30)), "error"),
        ("slope-zero", _dicom_case(_set(RescaleSlope=0)), "error"),
        ("intercept-huge", _dicom_case(_set(RescaleIntercept=1e9)), "error"),
        ("slope-one-slice", _dicom_case(_set(RescaleSlope=1000), files="one"), "error"),
        ("eight-bit", _dicom_case(_eight_bit), "error"),
        ("big-endian-pixels", _dicom_case(_big_endian_pixels), "error"),
        ("modality-mr", _dicom_case(_set(Modality="MR")), "error"),
        ("rows-mismatch", _dicom_case(_set(Rows=200), files="one"), "error"),
        ("pixeldata-cut", _dicom_case(lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]), files="one"), "error"),
        ("duplicate-slice", _dicom_files(_dicom_duplicate_slice), "error"),
        ("missing-slices", _dicom_files(lambda f, names: [n.unlink() for n in names[4:7]]), "error"),
        ("junk-file", _dicom_files(lambda f, names: (f / "junk.dcm").write_bytes(b"junk" * 100)), "error"),
        ("truncated-file", _dicom_files(lambda f, names: names[5].write_bytes(names[5].read_bytes()[:3000])), "error"),
        ("all-junk", _dicom_files(lambda f, names: [n.write_bytes(b"\0" * 200) for n in names]), "error"),
    ]
    for name, build, expect in dicom:
        add(Case(f"info-dicom-{name}", "info", build, expect, needs="dicom"))
    add(Case("detect-dicom-slope-huge", "detect", _dicom_case(_set(RescaleSlope=1e30), cmd="detect"), needs="dicom"))
    add(Case("detect-dicom-pixelspacing-zero", "detect", _dicom_case(_set(PixelSpacing=[0, 0]), cmd="detect"),
             needs="dicom"))

    # paths
    add(Case("info-fifo-datafile", "info", _fifo_data, needs="phantom-raw"))
    add(Case("info-fifo-scan", "info", _fifo_scan))
    add(Case("info-missing-file", "info", lambda d, a: _info(d / "missing.mhd")))
    add(Case("info-empty-folder", "info", lambda d, a: _info(d)))
    add(Case("info-txt", "info", _write_bytes(b"hello", "notes.txt")))
    add(Case("info-mhd-empty", "info", _write_bytes(b"", "empty.mhd")))
    add(Case("info-mhd-binary", "info", _write_bytes(np.random.default_rng(3).bytes(3000), "binary.mhd")))
    add(Case("info-mhd-utf16", "info", _write_bytes("NDims = 3\nDimSize = 4 4 4\n".encode("utf-16"), "u16.mhd")))
    add(Case("info-mha-empty", "info", _write_bytes(b"", "empty.mha")))
    for v in ("-1", "x"):
        add(Case(f"info-option--min-slices={v}", "info", _option_case(
            lambda d, a, v=v: ["info", str(a.scans["phantom-raw"]), "--min-slices", v], "--min-slices")))

    # tables
    for table in TABLES:
        add(Case(f"evaluate-{table}-utf16", "evaluate", _table_case(table, lambda b: b.encode("utf-16"))))
        add(Case(f"evaluate-{table}-binary", "evaluate",
                 _table_case(table, np.random.default_rng(4).bytes(2000))))
        add(Case(f"evaluate-{table}-nul", "evaluate", _table_case(table, lambda b: b.encode()[:40] + b"\0\0" +
                                                                  b.encode()[40:])))
        add(Case(f"evaluate-{table}-latin1", "evaluate",
                 _table_case(table, lambda b: b.replace("s1", "s\xe91", 1).encode("latin-1"))))
        add(Case(f"evaluate-{table}-empty", "evaluate", _table_case(table, b"")))
        add(Case(f"evaluate-{table}-missing", "evaluate", lambda d, a, t=table: Run(
            _evaluate(d, a, tables={t: d / "gone.csv"}), "gone.csv")))
        if table == "seriesuids":
            add(Case("evaluate-seriesuids-duplicate", "evaluate", _table_case(table, b"s1\ns2\ns2\ns3\n"), "warn"))
            continue
        value = "probability" if table == "detections" else "diameter_mm"
        header = f"seriesuid,coordX,coordY,coordZ,{value}\n"
        for name, row in (("short-row", "s1,1.0,2.0\n"), ("coord-text", "s1,x,2.0,3.0,0.5\n"),
                          ("coord-nan", "s1,nan,2.0,3.0,0.5\n"), ("coord-inf", "s1,1.0,inf,3.0,0.5\n"),
                          ("value-text", "s1,1.0,2.0,3.0,abc\n"), ("value-nan", "s1,1.0,2.0,3.0,nan\n"),
                          ("empty-uid", ",1.0,2.0,3.0,0.5\n"), ("unknown-uid", "s9,1.0,2.0,3.0,0.5\n")):
            if name == "unknown-uid" and table != "detections":
                continue  # annotations cover every scan; the evaluated list may be a subset
            add(Case(f"evaluate-{table}-{name}", "evaluate",
                     _table_case(table, lambda b, r=row: (b + r).encode())))
        add(Case(f"evaluate-{table}-no-column", "evaluate",
                 _table_case(table, (header.replace(f",{value}", "") + "s1,1.0,2.0,3.0\n").encode())))
        add(Case(f"evaluate-{table}-duplicated-rows", "evaluate",
                 _table_case(table, lambda b: (b + b.split("\n", 1)[1]).encode()), "warn"))
    for name, row in (("prob-above-1", "s1,1.0,2.0,3.0,1.5\n"), ("prob-negative", "s1,1.0,2.0,3.0,-0.1\n"),
                      ("prob-huge", "s1,1.0,2.0,3.0,1e300\n")):
        add(Case(f"evaluate-detections-{name}", "evaluate", _table_case("detections", lambda b, r=row: (b + r).encode())))
    for name, row in (("zero-mm", "s2,5.0,5.0,5.0,0\n"), ("negative-mm", "s2,5.0,5.0,5.0,-4\n")):
        add(Case(f"evaluate-annotations-{name}", "evaluate", _table_case("annotations", lambda b, r=row: (b + r).encode())))
    add(Case("evaluate-excluded-zero-mm", "evaluate", _table_case("excluded", lambda b: (b + "s2,5.0,5.0,5.0,0\n").encode())))

    # options
    for opt, values in (("--threshold", ("nan", "inf", "2", "-1", "x")), ("--bootstrap", ("-1", "1.5", "x")),
                        ("--max-marks", ("0", "-1", "x")), ("--max-sensitivity-loss", ("-1", "nan", "2", "inf")),
                        ("--seed", ("-1", "x"))):
        for v in values:
            add(Case(f"evaluate-option{opt}={v}", "evaluate", _evaluate_option(opt, v)))
    for opt, values in (("--threshold", ("2", "nan", "-1", "inf", "x")), ("--seg-threshold", ("2", "nan", "-1", "x")),
                        ("--batch-size", ("0", "-2", "x")), ("--threads", ("0", "-1")),
                        ("--min-volume", ("-5", "nan", "inf")), ("--min-diameter", ("-1", "nan", "inf", "x")),
                        ("--max-png", ("-1", "x")), ("--views", ("3", "0", "x")), ("--views-from", ("2", "-1", "nan")),
                        ("--view-mean", ("median", ""))):
        for v in values:
            add(Case(f"detect-option{opt}={v}", "detect", _detect_option(opt, v)))
    for args, name in ((("--scans", "0"), "--scans"), (("--scans", "-1"), "--scans"), (("--size", "0"), "--size"),
                       (("--size", "-5"), "--size"), (("--size", "100000"), "--size"), (("--max-slices", "0"), "--max-slices"),
                       (("--max-slices", "-1"), "--max-slices"), (("--workers", "0"), "--workers"),
                       (("--workers", "-1"), "--workers"), (("--seed", "-1"), "--seed"), (("--seed", "x"), "--seed")):
        add(Case(f"synth-option{args[0]}={args[1]}", "synth", _synth_option(*args, name=name)))
    for command in ("detect", "evaluate", "synth"):
        add(Case(f"{command}-out-under-file", command, _out_under_file(command)))
        add(Case(f"{command}-out-is-file", command, _out_is_file(command)))

    # models
    crafted = [
        ("cls", "widths-text", lambda c: c.update(widths="abc")),
        ("cls", "widths-negative", lambda c: c.update(widths=[[-1, 8]])),
        ("cls", "widths-nested-text", lambda c: c.update(widths=[["a", "b"]])),
        ("cls", "widths-empty", lambda c: c.update(widths=[[]])),
        ("cls", "crop-zero", lambda c: c.update(crop=[0, 0, 0])),
        ("cls", "crop-text", lambda c: c.update(crop="abc")),
        ("cls", "crop-huge", lambda c: c.update(crop=[100000, 100000, 100000])),
        ("cls", "crop-two", lambda c: c.update(crop=[32, 48])),
        ("cls", "crop-spacing-nan", lambda c: c.update(crop_spacing_mm=[float("nan")] * 3)),
        ("cls", "crop-spacing-zero", lambda c: c.update(crop_spacing_mm=[0, 0, 0])),
        ("cls", "crop-spacing-text", lambda c: c.update(crop_spacing_mm="abc")),
        ("cls", "not-a-dict", lambda c: [1, 2, 3]),
        ("cls", "no-state", lambda c: {"widths": c["widths"]}),
        ("cls", "malicious", _malicious),
        ("seg", "widths-text", lambda c: c.update(widths="abc")),
        ("seg", "widths-bad-dict", lambda c: c.update(widths={"depth": -3})),
        ("seg", "malicious", _malicious),
        ("seg", "state-shapes", lambda c: c["model_state"].update(
            {k: v[:1] for k, v in list(c["model_state"].items())[:1]})),
    ]
    for which, name, edit in crafted:
        add(Case(f"detect-{which}-ckpt-{name}", "detect", _crafted_checkpoint(which, edit), needs="phantom-raw"))
    add(Case("detect-seg-as-cls", "detect", _seg_as_cls, needs="phantom-raw"))
    add(Case("detect-ckpt-empty-file", "detect", _empty_ckpt, needs="phantom-raw"))
    add(Case("detect-cls-nan-weights", "detect", _crafted_checkpoint("cls", _nan_weights), needs="phantom-raw"))
    add(Case("detect-seg-nan-weights", "detect", _crafted_checkpoint("seg", _nan_weights), needs="phantom-raw"))
    add(Case("detect-same-file-names", "detect", _detect_batch("dup"), "warn", needs="phantom-raw"))
    add(Case("detect-one-of-two-broken", "detect", _detect_batch("mixed"), needs="phantom-raw"))

    # export / bench: validation lands with the deploy refactor
    add(Case("bench-runs-0", "bench", _bench("--runs", "0", name="--runs")))
    add(Case("bench-size-0", "bench", _bench("--size", "0", name="--size")))
    add(Case("bench-json-dev-full", "bench", _bench("--json", "/dev/full", name="/dev/full")))
    add(Case("export-out-is-file", "export", _export(lambda d, a: a.seg, _file_in, "afile.txt")))
    # crafted checkpoints reach export through models.checkpoint, which refuses them
    add(Case("export-crafted-widths", "export", _export(_crafted_seg_file(lambda c: c.update(widths="abc")),
                                                        lambda d: d / "out", "crafted.pt")))
    # export reads the kind from the checkpoint; a classifier forced through the U-Net's loader
    add(Case("export-cls-as-seg", "export", _export(lambda d, a: a.cls, lambda d: d / "out", "cls.pt", "--kind", "seg")))
    return out


def _empty_ckpt(d: Path, a: Assets) -> Run:
    p = d / "empty.pt"
    p.write_bytes(b"")
    run = _detect(a, [str(a.scans["phantom-raw"])], d / "out", name=p.name)
    run.argv[run.argv.index("--cls") + 1] = str(p)
    return run


# --------------------------------------------------------------------------------------- runner


class _Timeout(BaseException):
    """Raised by the alarm: a subclass of BaseException so that no ``except Exception`` swallows it."""


@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    crashed: str = ""  # the traceback of an exception that escaped main
    hung: bool = False


@contextlib.contextmanager
def _captured_fds():
    """Point file descriptors 1 and 2 (and sys.stdout/sys.stderr) at temporary files."""
    import tempfile

    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    sys.stdout = open(1, "w", closefd=False, buffering=1, errors="replace")
    sys.stderr = open(2, "w", closefd=False, buffering=1, errors="replace")
    texts: list[str] = []
    try:
        yield texts
    finally:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        for f in files:
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
            f.close()


def _reset_logging() -> None:
    """A console handler on the current stderr at WARNING: info lines are progress, not diagnostics."""
    root = logging.getLogger("nodulekit")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    root.propagate = False


def run_in_process(argv: list[str], timeout: float = TIMEOUT_S) -> Result:
    from nodulekit.cli import main

    rc, crashed, hung = None, "", False

    def alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, alarm)
    with _captured_fds() as texts:
        _reset_logging()
        signal.alarm(int(timeout))
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except _Timeout:
            hung = True
        except BaseException:  # noqa: BLE001 - an escaped exception is the outcome being measured
            crashed = traceback.format_exc()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            logging.getLogger("nodulekit").handlers.clear()
    stdout, stderr = texts
    return Result(rc, stdout, stderr + crashed, crashed, hung)


def run_subprocess(argv: list[str], timeout: float = 30) -> Result:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO / "src")}
    try:
        p = subprocess.run([sys.executable, "-m", "nodulekit", *argv], capture_output=True, text=True,
                           timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return Result(None, exc.stdout or "", exc.stderr or "", hung=True)
    # the info lines of the logger are progress: keep the diagnostics only, as in process
    err = "\n".join(ln for ln in p.stderr.splitlines() if not _is_info_line(ln))
    return Result(p.returncode, p.stdout, err)


_INFO_PREFIXES = ("[nodulekit.detect] seg ", "[nodulekit.detect] scans ok")


def _is_info_line(line: str) -> bool:
    return line.startswith(_INFO_PREFIXES)


def _snapshot(folder: Path | None) -> dict[str, bytes] | None:
    if folder is None or not folder.is_dir():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def classify(run: Run, res: Result, before: dict | None, after: dict | None, expect: str) -> str:
    if res.hung:
        return "hang"
    if res.crashed.startswith("signal") or (res.rc is not None and res.rc < 0):
        return "crash"
    if res.crashed or "Traceback" in res.stderr or "internal error" in res.stderr:
        return "traceback"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if not lines and res.rc:  # older builds printed the per-item error on stdout
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("SKIP", "FAILED"))]
    if before is not None and after is not None and res.rc:
        if any(after.get(k) != v for k, v in before.items()):
            return "lost"
    if res.rc == 0:
        named = [ln for ln in lines if run.name in ln and "warning" in ln.lower()]
        ours = all(ln.startswith(("[nodulekit", "nodulekit")) for ln in lines)
        if expect in ("warn", "either") and named and ours:
            return "warning"
        return "accepted"
    if len(lines) == 1 and run.name in lines[0]:
        return "clean"
    return "noisy"


_PRELOAD = ("SimpleITK", "pydicom", "torch", "tqdm", "matplotlib.pyplot", "nodulekit.cli", "nodulekit.cli.detect",
            "nodulekit.data.ct", "nodulekit.evaluate.froc", "nodulekit.detect.pipeline", "nodulekit.detect.render",
            "nodulekit.deploy.runtime", "nodulekit.models.checkpoint")
# the fork server: imports the CLI's modules and runs nothing, then forks one child per case and
# reports how it ended on its own pipe
_SERVER = r"""
import importlib, json, os, pickle, sys, time
reply = int(sys.argv[1])
sys.path[:0] = json.loads(sys.argv[2])
import test_fuzz
for name in test_fuzz._PRELOAD:
    importlib.import_module(name)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            res = test_fuzz.run_in_process(req["argv"], req["timeout"])
            with open(req["box"], "wb") as fh:
                pickle.dump(res, fh)
        finally:
            os._exit(0)
    deadline, status = time.monotonic() + req["timeout"] + 10, None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        else:
            time.sleep(0.002)
    sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else 0
    os.write(reply, (json.dumps({"hung": status is None, "signal": sig}) + "\n").encode())
"""
_server: dict = {}


def _fork_server():
    """A fresh process to fork the cases from: the test process may hold torch's thread pools
    (other tests ran models), which a forked child would inherit locked."""
    if "proc" not in _server or _server["proc"].poll() is not None:
        import atexit

        r, w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO / "src")}
        proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(w), json.dumps(sys.path)], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(w,), env=env, text=True)
        os.close(w)
        _server.update(proc=proc, reply=os.fdopen(r, "r"))
        atexit.register(proc.stdin.close)
    return _server["proc"], _server["reply"]


def _in_child(run: Run, timeout: float) -> Result:
    """``run_in_process`` in a child of the fork server: a crash or a hang ends the child only."""
    import pickle
    import tempfile

    proc, reply = _fork_server()
    with tempfile.TemporaryDirectory() as tmp:
        box = Path(tmp) / "result.pickle"
        proc.stdin.write(json.dumps({"argv": run.argv, "timeout": timeout, "box": str(box)}) + "\n")
        proc.stdin.flush()
        status = json.loads(reply.readline())
        if status["hung"]:
            return Result(None, "", "", hung=True)
        if status["signal"] or not box.exists():
            return Result(None, "", f"process died (signal {status['signal']})", crashed=f"signal {status['signal']}")
        return pickle.loads(box.read_bytes())


def run_case(case: Case, d: Path, a: Assets) -> tuple[str, Run, Result]:
    d.mkdir(parents=True, exist_ok=True)
    run = case.build(d, a)
    before = _snapshot(run.keep)
    res = run_subprocess(run.argv) if run.subprocess else _in_child(run, TIMEOUT_S)
    return classify(run, res, before, _snapshot(run.keep), case.expect), run, res


def counts_table(outcomes: Counter) -> str:
    rows = [
        ("gave a clean one-line error naming the file (or option)", outcomes["clean"]),
        ("gave a named warning and exit 0 (cases where a warning is enough)", outcomes["warning"]),
        ("gave a clean error buried in ITK warnings or torch text", outcomes["noisy"]),
        ("ended in a Python traceback (or an internal error)", outcomes["traceback"]),
        ("crashed the process (segmentation fault)", outcomes["crash"]),
        ("were accepted with exit 0, producing wrong data", outcomes["accepted"]),
        ("hung", outcomes["hang"]),
        ("lost the previous results in the output folder", outcomes["lost"]),
    ]
    total = sum(outcomes.values())
    return "\n".join([f"| outcome ({total} cases) | count |", "|---|---:|"] + [f"| {t} | {n} |" for t, n in rows])


# ---------------------------------------------------------------------------------------- tests

ALL_CASES = cases()


@pytest.fixture(scope="session")
def fuzz_assets(tmp_path_factory) -> Assets:
    return build_assets(tmp_path_factory.mktemp("fuzz-assets"))


def _params():
    for case in ALL_CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.id, marks=marks)


def test_at_least_300_cases():
    assert len(ALL_CASES) >= 300
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES)


@pytest.mark.parametrize("case", list(_params()))
def test_hostile_input(case: Case, fuzz_assets: Assets, tmp_path: Path):
    if case.needs and case.needs not in fuzz_assets.scans:
        pytest.skip(f"needs {case.needs} (real CT samples not found under {REAL_DATA})")
    outcome, run, res = run_case(case, tmp_path / "case", fuzz_assets)
    detail = f"rc={res.rc}\nstdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-4000:]}"
    allowed = {"error": {"clean"}, "warn": {"warning"}, "either": {"clean", "warning"}}[case.expect]
    assert outcome in allowed, f"{case.id}: {outcome}\n{detail}"
