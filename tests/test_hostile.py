"""Hostile input beyond the fuzz table: a killed detect run, a full disk, and property-based
MetaImage headers and CSV tables (Hypothesis)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodulekit.errors import InputError

REPO = Path(__file__).resolve().parents[1]
HYPOTHESIS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _scan(folder: Path, name: str = "scan.mhd", depth: int = 12) -> Path:
    from test_fuzz import _phantom_image

    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = _phantom_image()
    sitk.WriteImage(img[:, :, :depth] if depth < 12 else img, str(folder / name))
    return folder / name


# ----------------------------------------------------------------------------- results never lost


def _fake_runners(monkeypatch):
    from nodulekit.deploy import runtime

    def seg(x):
        c = x[:, 3]
        return ((c > -300) & (c < 50)).astype(np.float32)[:, None]

    monkeypatch.setattr(runtime, "load_seg_runner", lambda *a, **k: seg)
    monkeypatch.setattr(runtime, "load_cls_runner", lambda *a, **k: lambda x: np.full(len(x), 0.7, np.float32))


def test_a_run_where_every_input_fails_keeps_the_earlier_results(tmp_path, monkeypatch):
    from nodulekit.detect import run_detection

    _fake_runners(monkeypatch)
    good = _scan(tmp_path / "in")
    out = tmp_path / "out"
    first = run_detection([good], "seg.pt", "cls.pt", out, progress=False, max_png=1)
    assert first["written"] and first["scans_ok"] == 1
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    second = run_detection([tmp_path / "missing.mhd"], "seg.pt", "cls.pt", out, progress=False)
    assert not second["written"] and second["scans_failed"] == 1
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left, no marker


def test_a_rerun_replaces_table_json_and_pngs_together(tmp_path, monkeypatch):
    from nodulekit.detect import run_detection

    _fake_runners(monkeypatch)
    out = tmp_path / "out"
    (out / "png").mkdir(parents=True)
    (out / "png" / "stale_0.png").write_bytes(b"old")
    run_detection([_scan(tmp_path / "in", "new.mhd")], "seg.pt", "cls.pt", out, progress=False, max_png=1)
    report = json.loads((out / "nodules.json").read_text())
    pngs = sorted(p.name for p in (out / "png").iterdir())
    assert pngs == ["new_0.png"]  # the earlier run's PNG went with its table
    assert report["scans"][0]["nodules"][0]["png"] == str(out / "png" / "new_0.png")
    assert not (out / ".incomplete").exists()


def test_same_file_names_in_two_folders_get_unique_ids(tmp_path, monkeypatch, caplog):
    from nodulekit.detect import run_detection

    _fake_runners(monkeypatch)
    a, b = _scan(tmp_path / "a", "slab.mhd"), _scan(tmp_path / "b", "slab.mhd")
    s = run_detection([a, b], "seg.pt", "cls.pt", tmp_path / "out", progress=False, max_png=1)
    assert [x["seriesuid"] for x in s["scans"]] == ["slab", "slab-2"]
    assert sorted(p.name for p in (tmp_path / "out" / "png").iterdir()) == ["slab-2_0.png", "slab_0.png"]
    assert any(f"{b}: warning: seriesuid slab is already used by {a}" in r.getMessage() for r in caplog.records)


def test_nan_model_output_fails_that_scan_and_the_batch_goes_on(tmp_path, monkeypatch):
    from nodulekit.deploy import runtime
    from nodulekit.detect import run_detection

    _fake_runners(monkeypatch)
    calls = []

    def cls(x):
        calls.append(len(x))
        return np.full(len(x), np.nan if len(calls) == 1 else 0.7, np.float32)

    monkeypatch.setattr(runtime, "load_cls_runner", lambda *a, **k: cls)
    s = run_detection([_scan(tmp_path / "a", "one.mhd"), _scan(tmp_path / "b", "two.mhd")], "s", "c",
                      tmp_path / "out", progress=False, png=False)
    assert s["scans_ok"] == 1 and s["scans_failed"] == 1
    assert re.search(r"the classifier c gave \d+ NaN/Inf output\(s\)", s["failed"][0]["error"])
    assert s["failed"][0]["error"].startswith(str(tmp_path / "a" / "one.mhd"))


def _detect_process(inputs, out: Path, seg: Path, cls: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "nodulekit", "detect", *map(str, inputs), "--seg", str(seg),
                             "--cls", str(cls), "--out", str(out), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_killed_detect_leaves_the_earlier_results_intact(tmp_path, sig):
    from test_fuzz import _previous_results, fast_models

    seg, cls = fast_models(tmp_path / "models")
    scans = [_scan(tmp_path / "in", f"s{k}.mhd") for k in range(30)]
    out = _previous_results(tmp_path / "out")
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = _detect_process(scans, out, seg, cls)
    deadline = time.monotonic() + 120
    while not list(out.glob(".staging-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # well into the run
    assert proc.poll() is None, f"detect ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()
             if not str(p.relative_to(out)).startswith(".staging-")}
    assert after == before or (out / ".incomplete").exists()
    # the next run cleans up after the killed one and replaces the results
    done = _detect_process(scans[:1], out, seg, cls)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    assert not list(out.glob(".staging-*")) and not (out / ".incomplete").exists()
    rows = (out / "nodules.csv").read_text().splitlines()
    assert rows[0].startswith("seriesuid") and all(r.startswith("s0,") for r in rows[1:])
    assert not (out / "png" / "old_0.png").exists()


def test_data_outside_the_folder_needs_permission_but_a_link_placed_there_is_followed(tmp_path):
    from test_fuzz import _data_file, _edit_header

    from nodulekit.data.ct import read_ct

    scan = _scan(tmp_path / "scan")
    data = _data_file(scan)
    shared = tmp_path / "store" / "voxels.raw"
    shared.parent.mkdir()
    data.rename(shared)
    _edit_header(scan, {"ElementDataFile": "../store/voxels.raw"})
    with pytest.raises(InputError, match="outside the scan's folder"):
        read_ct(scan)
    assert read_ct(scan, allow_external_data=True).shape == (12, 96, 96)
    data.symlink_to(shared)  # as git-annex keeps a dataset's files
    _edit_header(scan, {"ElementDataFile": data.name})
    assert read_ct(scan).shape == (12, 96, 96)


# ------------------------------------------------------------------------------ the CLI boundary


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from nodulekit import io
    from nodulekit.cli import main

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(io, "atomic_write_text", full)
    det = tmp_path / "d.csv"
    det.write_text("seriesuid,coordX,coordY,coordZ,probability\ns1,0,0,0,0.5\n")
    ann = tmp_path / "a.csv"
    ann.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,0,0,0,5\n")
    rc = main(["evaluate", "--detections", str(det), "--annotations", str(ann), "--out", str(tmp_path / "o"),
               "--bootstrap", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1] == f"nodulekit evaluate: error: {tmp_path / 'o' / 'froc.json'}: No space left on device"


def test_an_unforeseen_exception_is_one_line_and_a_traceback_with_v(tmp_path, monkeypatch, capsys):
    from nodulekit.cli import main
    from nodulekit.data import ct

    def boom(*a, **k):
        raise ZeroDivisionError("surprise")

    monkeypatch.setattr(ct, "iter_ct_inputs", boom)
    assert main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nodulekit info: internal error: ZeroDivisionError: surprise (run with -v for the traceback)"]
    with pytest.raises(ZeroDivisionError):
        main(["-v", "info", str(tmp_path)])


def test_option_errors_are_one_line(capsys):
    from nodulekit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--detections", "d", "--annotations", "a", "--out", "o", "--bootstrap", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bootstrap" in err[0] and "non-negative" in err[0]


# ------------------------------------------------------------------ property-based: MetaImage headers

_NUMBERS = st.one_of(st.integers(-5, 70000).map(str), st.sampled_from(["nan", "inf", "-inf", "1e400", "", "x", "0x10",
                                                                          "1.5", "-0", "12 12", "\u0663"]))
FIELDS = {
    "NDims": _NUMBERS, "DimSize": st.lists(_NUMBERS, min_size=0, max_size=4).map(" ".join),
    "ElementType": st.sampled_from(["MET_SHORT", "MET_FLOAT", "MET_UCHAR", "MET_USHORT", "MET_INT", "MET_X", ""]),
    "ElementNumberOfChannels": _NUMBERS, "HeaderSize": _NUMBERS, "CompressedData": st.sampled_from(["True", "False"]),
    "CompressedDataSize": _NUMBERS, "ElementSpacing": st.lists(_NUMBERS, min_size=0, max_size=4).map(" ".join),
    "Offset": st.lists(_NUMBERS, min_size=0, max_size=4).map(" ".join),
    "TransformMatrix": st.lists(st.sampled_from(["0", "1", "-1", "0.5", "nan", "a"]), min_size=0, max_size=10).map(" ".join),
    "BinaryDataByteOrderMSB": st.sampled_from(["True", "False", "maybe"]),
    "ElementDataFile": st.sampled_from(["data.raw", "LOCAL", "../data.raw", "/etc/hostname", "nope.raw", "LIST", ""]),
}
VALID = {"ObjectType": "Image", "NDims": "3", "DimSize": "8 8 8", "ElementType": "MET_SHORT",
         "ElementSpacing": "1 1 1", "ElementDataFile": "data.raw"}


@HYPOTHESIS
@given(changes=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.one_of(st.none(), FIELDS[k]) for k in keys})))
def test_any_metaimage_header_reads_or_fails_with_an_input_error(tmp_path_factory, changes):
    from nodulekit.data.ct import read_ct

    d = tmp_path_factory.mktemp("mhd")
    voxels = np.where(np.arange(512) % 3 == 0, -1000, 40).astype("<i2").reshape(8, 8, 8)
    (d / "data.raw").write_bytes(voxels.tobytes())
    header = {**VALID, **changes}
    header = {k: v for k, v in header.items() if v is not None}
    data_file = header.pop("ElementDataFile", None)
    lines = [f"{k} = {v}" for k, v in header.items()] + ([f"ElementDataFile = {data_file}"] if data_file is not None else [])
    path = d / "scan.mhd"
    path.write_text("\n".join(lines) + "\n")
    try:
        ct = read_ct(path)
    except InputError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    # accepted: then it is what the file holds, in CT HU
    assert ct.shape == (8, 8, 8) and np.array_equal(np.asarray(ct.hu, np.int64), voxels.astype(np.int64))
    assert all(np.isfinite(ct.spacing)) and min(ct.spacing) > 0 and all(np.isfinite(ct.origin))


# ------------------------------------------------------------------------- property-based: tables

_CELL = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8),
                  st.sampled_from(["0.5", "1", "0", "-1", "s1", "", '"', "\u00e9", "\x00"]))
_ROW = st.lists(_CELL, min_size=0, max_size=7)


@HYPOTHESIS
@given(rows=st.lists(_ROW, max_size=8), encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", "utf-8-sig"]),
       header=st.sampled_from(["seriesuid,coordX,coordY,coordZ,probability", "seriesuid,coordX,coordY,coordZ",
                               "seriesuid,coordX,coordY,coordZ,diameter_mm", ""]))
def test_any_table_reads_or_fails_with_an_input_error(tmp_path_factory, rows, encoding, header):
    from nodulekit.data.luna import read_annotations, read_marks, read_seriesuids

    path = tmp_path_factory.mktemp("csv") / "table.csv"
    text = "\n".join([header] + [",".join(r) for r in rows]) + "\n"
    path.write_bytes(text.encode(encoding, errors="replace"))
    for reader in (read_marks, read_annotations, read_seriesuids):
        try:
            out = reader(path)
        except InputError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
            continue
        if reader is read_marks:
            assert all(0 <= m.probability <= 1 and all(np.isfinite(m.center_xyz)) for m in out)
            assert len(set(out)) == len(out)
        elif reader is read_annotations:
            assert all(a.diameter_mm > 0 and all(np.isfinite(a.center_xyz)) for a in out)
        else:
            assert all(isinstance(u, str) and u for u in out) and len(set(out)) == len(out)


@HYPOTHESIS
@given(probs=st.lists(st.floats(0, 1), min_size=0, max_size=12), threshold=st.floats(0, 1),
       loss=st.floats(0, 1), with_nodule=st.booleans())
def test_froc_json_is_always_strict_json(tmp_path_factory, probs, threshold, loss, with_nodule):
    from nodulekit.evaluate.froc import evaluate_froc

    d = tmp_path_factory.mktemp("froc")
    (d / "det.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\n"
                               + "".join(f"s1,{k}.0,0,0,{p!r}\n" for k, p in enumerate(probs)))
    (d / "ann.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + ("s1,0,0,0,6\n" if with_nodule else ""))
    (d / "uids.csv").write_text("s1\ns2\n")
    evaluate_froc(d / "det.csv", d / "ann.csv", None, d / "uids.csv", d / "out", n_bootstrap=3,
                  threshold=threshold, max_sensitivity_loss=loss)
    json.loads((d / "out" / "froc.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in froc.json"))

