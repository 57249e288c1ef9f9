"""Reading CT: real MetaImage and DICOM series, NIfTI, bad inputs, and batch expansion."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from nodulekit.data.ct import iter_ct_inputs, read_ct, scan_stem, write_ct
from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError

from conftest import CPTAC_UID, LIDC_UID


@pytest.fixture(scope="session")
def cptac(cptac_mhd) -> CTVolume:
    return read_ct(cptac_mhd)


@pytest.fixture(scope="session")
def lidc(lidc_dicom) -> CTVolume:
    return read_ct(lidc_dicom)


def small_ct(n: int = 8, dtype=np.int16, direction=None) -> CTVolume:
    rng = np.random.default_rng(n)
    hu = rng.integers(-1000, 400, size=(n, 16, 20)).astype(dtype)
    return CTVolume(hu, origin=(-10.0, 5.0, 30.0), spacing=(0.7, 0.8, 2.5),
                    direction=np.eye(3) if direction is None else direction, seriesuid="", source="")


def assert_names(err: pytest.ExceptionInfo, path: Path):
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg, msg


# --- real series ---------------------------------------------------------------------------------

def test_cptac_metaimage(cptac, cptac_mhd):
    assert cptac.shape == (99, 512, 512)
    assert cptac.hu.dtype == np.int16
    assert cptac.seriesuid == CPTAC_UID
    assert cptac.spacing == pytest.approx((0.564453125, 0.564453125, 3.0))
    assert cptac.origin == pytest.approx((-143.2177734375, -287.2177734375, -288.0))
    np.testing.assert_allclose(cptac.direction, np.eye(3))
    assert cptac.source == str(cptac_mhd)
    assert np.percentile(cptac.hu, 1) < -900 and cptac.hu.max() > 300  # air and bone


def test_lidc_dicom_series(lidc):
    assert lidc.shape == (12, 512, 512)
    assert lidc.seriesuid == LIDC_UID
    assert lidc.hu.dtype == np.int16
    assert lidc.spacing == pytest.approx((0.681641, 0.681641, 1.25), abs=1e-5)
    # slices ascend in z from -94.5 to -80.75 mm
    z = lidc.voxel_to_world(np.array([[i, 0, 0] for i in range(12)]))[:, 2]
    np.testing.assert_allclose(z, -94.5 + 1.25 * np.arange(12), atol=1e-4)
    # rescale applied: the corners outside the body are air, near -1000 HU (raw would be 0..4095)
    corner = np.asarray(lidc.hu[:, 40:60, 250:260])
    assert -1100 < np.median(corner) < -900
    assert lidc.hu.min() < 0


def test_lidc_min_slices(lidc_dicom):
    with pytest.raises(InputError, match="12 slice") as err:
        read_ct(lidc_dicom, min_slices=13)
    assert_names(err, lidc_dicom)


# --- formats ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,compress", [("s.mhd", False), ("s.mhd", True), ("s.nii", False),
                                           ("s.nii.gz", True)])
def test_round_trip_formats(tmp_path, name, compress):
    ct = small_ct()
    path = write_ct(ct, tmp_path / name, compress=compress)
    back = read_ct(path)
    np.testing.assert_array_equal(back.hu, ct.hu)
    assert back.hu.dtype == np.int16
    assert back.seriesuid == "s"
    assert back.spacing == pytest.approx(ct.spacing)
    assert back.origin == pytest.approx(ct.origin, abs=1e-4)


def test_float_volume_kept_float(tmp_path):
    ct = small_ct(dtype=np.float32)
    ct.hu = ct.hu + 0.5
    back = read_ct(write_ct(ct, tmp_path / "f.mhd", dtype=np.float32))
    assert back.hu.dtype == np.float32
    np.testing.assert_allclose(back.hu, ct.hu)


def test_int32_narrowed_to_int16(tmp_path):
    back = read_ct(write_ct(small_ct(), tmp_path / "i.nii", dtype=np.int32))
    assert back.hu.dtype == np.int16


def test_scan_stem():
    assert scan_stem("/a/1.2.3.nii.gz") == "1.2.3"
    assert scan_stem("1.2.3.mhd") == "1.2.3"


# --- bad inputs: each message names the file ----------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file") as err:
        read_ct(tmp_path / "nope.mhd")
    assert_names(err, tmp_path / "nope.mhd")


def test_missing_raw(tmp_path):
    path = write_ct(small_ct(), tmp_path / "a.mhd")
    (tmp_path / "a.raw").unlink()
    with pytest.raises(InputError, match="a.raw not found") as err:
        read_ct(path)
    assert_names(err, path)


def test_truncated_raw(tmp_path):
    path = write_ct(small_ct(), tmp_path / "a.mhd")
    with open(tmp_path / "a.raw", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(InputError, match="truncated") as err:
        read_ct(path)
    assert_names(err, path)


@pytest.mark.parametrize("drop_size_key", [False, True])
def test_truncated_zraw(tmp_path, drop_size_key):
    path = write_ct(small_ct(), tmp_path / "a.mhd", compress=True)
    data = (tmp_path / "a.zraw").read_bytes()
    (tmp_path / "a.zraw").write_bytes(data[: len(data) // 2])
    if drop_size_key:  # without CompressedDataSize only inflating the stream shows the cut
        text = path.read_text()
        path.write_text("\n".join(l for l in text.splitlines() if not l.startswith("CompressedDataSize")))
    with pytest.raises(InputError, match="a.zraw is truncated") as err:
        read_ct(path)
    assert_names(err, path)


@pytest.mark.parametrize("etype,extra", [("MET_UCHAR", ""), ("MET_USHORT", ""),
                                         ("MET_SHORT", "ElementNumberOfChannels = 3\n"),
                                         ("MET_WHATEVER", "")])
def test_unsupported_element_type(tmp_path, etype, extra):
    path = write_ct(small_ct(), tmp_path / "a.mhd")
    text = path.read_text().replace("ElementType = MET_SHORT\n", f"{extra}ElementType = {etype}\n")
    path.write_text(text)
    with pytest.raises(InputError, match="ElementType|channel") as err:
        read_ct(path)
    assert_names(err, path)


def test_2d_image(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "flat.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(path))
    with pytest.raises(InputError, match="2-D") as err:
        read_ct(path)
    assert_names(err, path)


def test_rgb_nifti(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "rgb.nii"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(InputError, match="component") as err:
        read_ct(path)
    assert_names(err, path)


def test_nan_volume(tmp_path):
    ct = small_ct(dtype=np.float32)
    ct.hu[2, 3, 4] = np.nan
    ct.hu[1, 1, 1] = np.inf
    path = write_ct(ct, tmp_path / "nan.mhd", dtype=np.float32)
    with pytest.raises(InputError, match="2 NaN/Inf") as err:
        read_ct(path)
    assert_names(err, path)


def test_too_few_slices(tmp_path):
    path = write_ct(small_ct(n=5), tmp_path / "thin.mhd")
    assert read_ct(path).shape[0] == 5
    with pytest.raises(InputError, match="5 slice.*at least 7") as err:
        read_ct(path, min_slices=7)
    assert_names(err, path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported file type") as err:
        read_ct(path)
    assert_names(err, path)


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(InputError, match="empty folder") as err:
        read_ct(folder)
    assert_names(err, folder)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM") as err:
        read_ct(tmp_path)
    assert_names(err, tmp_path)


def test_a_folder_of_one_scan_file_reads_that_scan_as_detect_does(tmp_path):
    folder = tmp_path / "scan"
    folder.mkdir()
    ct = small_ct()
    write_ct(ct, folder / "s.mhd")
    np.testing.assert_array_equal(read_ct(folder).hu, ct.hu)
    assert read_ct(folder).seriesuid == "s"
    write_ct(ct, folder / "t.nii.gz")
    with pytest.raises(InputError, match="holds 2 scans") as err:
        read_ct(folder)
    assert_names(err, folder)


def _copy_dicom(src: Path, dst: Path, n: int | None = None) -> list[Path]:
    dst.mkdir()
    files = sorted(src.glob("*.dcm"))[:n]
    for f in files:
        shutil.copy(f, dst / f.name)
    return sorted(dst.glob("*.dcm"))


def _edit(files, **tags):
    import pydicom

    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(f)


def test_dicom_two_series(tmp_path, lidc_dicom):
    folder = tmp_path / "two"
    files = _copy_dicom(lidc_dicom, folder, n=6)
    other = "1.2.826.0.1.3680043.8.498.1"
    _edit(files[:3], SeriesInstanceUID=other)
    with pytest.raises(InputError, match="2 DICOM series") as err:
        read_ct(folder)
    assert_names(err, folder)
    assert other in str(err.value) and LIDC_UID in str(err.value)


def test_dicom_not_ct(tmp_path, lidc_dicom):
    folder = tmp_path / "mr"
    files = _copy_dicom(lidc_dicom, folder, n=4)
    _edit(files, Modality="MR")
    with pytest.raises(InputError, match="MR, not CT") as err:
        read_ct(folder)
    assert_names(err, folder)


def test_dicom_missing_slice(tmp_path, lidc_dicom):
    folder = tmp_path / "gap"
    files = _copy_dicom(lidc_dicom, folder)
    files[5].unlink()
    with pytest.raises(InputError, match="uneven DICOM slice spacing") as err:
        read_ct(folder)
    assert_names(err, folder)


# --- batch ------------------------------------------------------------------------------------------

def test_iter_ct_inputs_batch(tmp_path):
    good = [write_ct(small_ct(), tmp_path / "subset0" / f"1.2.{i}.mhd") for i in range(2)]
    bad = write_ct(small_ct(), tmp_path / "subset1" / "1.2.9.mhd")
    (tmp_path / "subset1" / "1.2.9.raw").unlink()
    write_ct(small_ct(), tmp_path / "masks" / "1.2.0.mhd")  # label volumes are not scans
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    items = list(iter_ct_inputs([tmp_path]))
    assert [k for k, _ in items] == [str(good[0]), str(good[1]), str(bad)]
    volumes = [v for _, v in items if isinstance(v, CTVolume)]
    errors = [v for _, v in items if isinstance(v, InputError)]
    assert len(volumes) == 2 and len(errors) == 1
    assert str(bad) in str(errors[0])
    # a subset folder, a file and a missing path
    items = list(iter_ct_inputs([tmp_path / "subset0", good[1], tmp_path / "gone.nii.gz"]))
    assert [type(v).__name__ for _, v in items] == ["CTVolume", "CTVolume", "CTVolume", "InputError"]


def test_iter_ct_inputs_is_lazy(tmp_path):
    for i in range(3):
        write_ct(small_ct(), tmp_path / f"s{i}.mhd")
    it = iter_ct_inputs([tmp_path])
    first = next(it)
    (tmp_path / "s2.raw").unlink()  # not read yet, so its loss shows up when reached
    rest = list(it)
    assert isinstance(first[1], CTVolume)
    assert isinstance(rest[0][1], CTVolume) and isinstance(rest[1][1], InputError)


def test_iter_ct_inputs_dicom_folder(lidc_dicom):
    items = list(iter_ct_inputs([lidc_dicom.parent / "LIDC-IDRI-0002_dicom"]))
    assert len(items) == 1 and items[0][1].seriesuid == LIDC_UID


def test_cli_info(capsys, tmp_path):
    from nodulekit.cli import main

    write_ct(small_ct(), tmp_path / "a.mhd")
    assert main(["info", str(tmp_path), str(tmp_path / "b.mhd")]) == 1  # one of the two failed
    captured = capsys.readouterr()
    assert "shape(z,y,x)=(8, 16, 20)" in captured.out and "1 of 2 scans could not be read" in captured.out
    assert captured.err.strip() == f"SKIP {tmp_path / 'b.mhd'}: no such file or folder"
    assert main(["info", str(tmp_path)]) == 0


def test_iter_ct_inputs_nested_dicom_and_nothing(tmp_path, lidc_dicom):
    root = tmp_path / "patients"
    _copy_dicom(lidc_dicom, root.parent / "tmp_series")
    (root / "p1" / "study").mkdir(parents=True)
    (root.parent / "tmp_series").rename(root / "p1" / "study" / "series")
    (root / "p2").mkdir()
    items = list(iter_ct_inputs([root]))
    assert [(k, v.seriesuid) for k, v in items] == [(str(root / "p1" / "study" / "series"), LIDC_UID)]
    items = list(iter_ct_inputs([root / "p2", tmp_path / "patients" / "p1" / "study"]))
    assert isinstance(items[0][1], InputError) and str(root / "p2") in str(items[0][1])
    assert items[1][1].seriesuid == LIDC_UID
