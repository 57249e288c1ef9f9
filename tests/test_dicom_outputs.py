"""detect's DICOM SEG, Comprehensive 3D SR and NIfTI label map, read back with highdicom, pydicom and
SimpleITK and checked against the detection's own mask and nodules.csv: on a synthetic DICOM series
and on the real LIDC-IDRI-0002 series."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_detect import fake_cls, fake_seg, phantom_ct

from nodulekit.data.ct import read_ct
from nodulekit.detect import detect_scan, run_detection
from nodulekit.detect.pacs import nodule_label_map, write_dicom_series


@pytest.fixture
def fake_models(monkeypatch, tmp_path):
    """Runners that mark -300..50 HU in the lung and give every candidate 0.7: no model files needed."""
    from nodulekit.deploy import runtime

    monkeypatch.setattr(runtime, "load_seg_runner", lambda *a, **k: fake_seg)
    monkeypatch.setattr(runtime, "load_cls_runner", lambda *a, **k: fake_cls)
    return tmp_path / "seg.pt", tmp_path / "cls.pt"


def _csv_nodules(out, uid: str, threshold: float = 0.5) -> np.ndarray:
    rows = [r for r in csv.DictReader(open(out / "nodules.csv")) if r["seriesuid"] == uid]
    return np.array([[float(r[k]) for k in ("coordX", "coordY", "coordZ")] for r in rows
                     if float(r["probability"]) >= threshold])


def few_cls(x: np.ndarray) -> np.ndarray:
    """0.7 for the first two candidates of each batch, 0.1 for the others: a handful of nodules on a
    real scan, where the stand-in segmentation marks a hundred vessel blobs."""
    return np.where(np.arange(len(x)) < 2, 0.7, 0.1).astype(np.float32)


def check_outputs(out, series_folder, cls=fake_cls, views: int = 8) -> dict:
    """Read back every object ``detect --dicom-seg --dicom-sr --nifti`` wrote for the series in
    ``series_folder`` and check it against a detection rerun on the same volume and nodules.csv."""
    import highdicom as hd
    import pydicom
    import SimpleITK as sitk
    from pydicom.sr.codedict import codes

    ct = read_ct(series_folder)
    report = json.loads((out / "nodules.json").read_text())
    (scan,) = [s for s in report["scans"] if s["seriesuid"] == ct.seriesuid]
    res = detect_scan(ct, fake_seg, cls, views=views)
    nodules = sorted((c for c in res["candidates"] if c.probability >= 0.5), key=lambda c: -c.probability)
    assert nodules, "the check would be vacuous: no nodule"
    label_map = nodule_label_map(res["labels"], nodules)
    masks = [label_map == k + 1 for k in range(len(nodules))]
    for c, mask in zip(nodules, masks):
        if c.n_voxels == np.count_nonzero(res["labels"][c.bbox] == c.label):  # a component of its own
            np.testing.assert_array_equal(mask, res["labels"] == c.label)
    sources = {}
    for p in series_folder.iterdir():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        k = int(round(float(ct.world_to_voxel(np.asarray(ds.ImagePositionPatient, float))[0])))
        sources[ds.SOPInstanceUID] = (k, ds)

    # SEG: one segment per nodule, each frame equal to the mask's slice, referencing the series
    seg = hd.seg.segread(scan["dicom_seg"])
    any_source = next(iter(sources.values()))[1]
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == any_source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == any_source.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == any_source.FrameOfReferenceUID
    assert list(seg.segment_numbers) == list(range(1, len(nodules) + 1))
    uids = sorted(sources, key=lambda u: sources[u][0])
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, ignore_spatial_locations=True,
                                               assert_missing_frames_are_empty=True)
    assert pixels.shape == (ct.shape[0], *ct.shape[1:], len(nodules))
    for k, mask in enumerate(masks):
        np.testing.assert_array_equal(pixels[..., k].astype(bool), mask)

    # SR: one planar ROI per nodule, its centre at nodules.csv's coordinates, its tracking UID the segment's
    sr = hd.sr.srread(scan["dicom_sr"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(nodules)
    centres = np.array([g.roi.value[0] for g in groups])
    assert all(g.roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT for g in groups)
    assert all(g.roi.frame_of_reference_uid == any_source.FrameOfReferenceUID for g in groups)
    np.testing.assert_allclose(centres, _csv_nodules(out, ct.seriesuid), atol=2e-3)
    seg_tracking = [seg.get_segment_description(k + 1).TrackingUID for k in range(len(nodules))]
    assert [str(g.tracking_uid) for g in groups] == seg_tracking
    for g, c in zip(groups, nodules):
        (long_axis,) = g.get_measurements(name=codes.SCT.LongAxis)
        (prob,) = g.get_measurements(name=codes.DCM.Probability)
        assert long_axis.unit == codes.UCUM.Millimeter
        # the long axis is at least the volume-equivalent diameter's in-plane share, and bounded by the box
        box_mm = max((s.stop - s.start) * sp for s, sp in zip(c.bbox[1:], ct.spacing[1::-1]))
        assert 0.5 * c.diameter_mm <= long_axis.value <= box_mm * 1.5
        assert prob.value == pytest.approx(c.probability, abs=1e-6)

    # NIfTI label map: the scan's geometry, nodule k as label k + 1
    img = sitk.ReadImage(scan["nifti"])
    np.testing.assert_allclose(img.GetOrigin(), ct.origin, atol=1e-3)
    np.testing.assert_allclose(img.GetSpacing(), ct.spacing, atol=1e-5)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), ct.direction, atol=1e-6)
    lab = sitk.GetArrayFromImage(img)
    assert lab.shape == ct.shape
    for k, mask in enumerate(masks):
        np.testing.assert_array_equal(lab == k + 1, mask)
    assert [n["segment"] for n in scan["nodules"]] == list(range(1, len(nodules) + 1))
    return scan


def test_seg_sr_nifti_of_a_synthetic_dicom_series(tmp_path, fake_models):
    folder = write_dicom_series(phantom_ct(), tmp_path / "series")
    out = tmp_path / "out"
    s = run_detection([folder], *fake_models, out, png=False, progress=False, dicom_seg=True, dicom_sr=True,
                      nifti=True, html=True)
    assert s["scans_ok"] == 1
    scan = check_outputs(out, folder)
    assert scan["viewer"] == str(out / "viewer" / f"{scan['seriesuid']}.html")
    assert (out / "viewer" / f"{scan['seriesuid']}.html").stat().st_size > 1000
    assert scan["nodules"][0]["viewer"].endswith("#slice=14")
    assert not list(out.glob(".staging-*"))


def test_seg_sr_nifti_of_the_real_lidc_series(tmp_path, fake_models, lidc_dicom, monkeypatch):
    out = tmp_path / "out"
    from nodulekit.deploy import runtime

    monkeypatch.setattr(runtime, "load_cls_runner", lambda *a, **k: few_cls)
    # few_cls scores a crop by its place in the batch, so its mirror images would not score alike
    s = run_detection([lidc_dicom], *fake_models, out, png=False, progress=False, dicom_seg=True, dicom_sr=True,
                      nifti=True, views=1)
    assert s["scans_ok"] == 1 and 2 <= s["n_nodules"] <= 20
    scan = check_outputs(out, lidc_dicom, cls=few_cls, views=1)
    from conftest import LIDC_UID

    assert scan["seriesuid"] == LIDC_UID


def test_dicom_flags_on_a_metaimage_write_the_label_map(tmp_path, fake_models, capsys):
    """--dicom-seg/--dicom-sr on a MetaImage: the NIfTI label map instead, no traceback, exit 0."""
    from nodulekit.cli import main
    from nodulekit.data.ct import write_ct

    scan = write_ct(phantom_ct(), tmp_path / "in" / "1.2.3.phantom.mhd")
    out = tmp_path / "out"
    rc = main(["detect", str(scan), "--seg", str(fake_models[0]), "--cls", str(fake_models[1]), "--out", str(out),
               "--dicom-seg", "--dicom-sr", "--no-png", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0 and "Traceback" not in printed.out + printed.err
    (entry,) = json.loads((out / "nodules.json").read_text())["scans"]
    assert "dicom_seg" not in entry and "dicom_sr" not in entry and not (out / "dicom").exists()
    assert entry["nifti"] == str(out / "nifti" / "1.2.3.phantom_labels.nii.gz") and (out / "nifti").is_dir()


def test_a_writer_that_fails_leaves_the_scan_and_says_why(tmp_path, fake_models, monkeypatch):
    """A DICOM series whose files vanish after reading: the SEG/SR are reported as not written, the
    detection and the other outputs stand, nothing half-written is left."""
    from nodulekit.detect import pacs

    folder = write_dicom_series(phantom_ct(), tmp_path / "series")

    def vanished(ct):
        raise pacs.InputError(ct.source, "the DICOM files give slices [] for a volume of 28")

    monkeypatch.setattr(pacs, "source_datasets", vanished)
    out = tmp_path / "out"
    s = run_detection([folder], *fake_models, out, png=False, progress=False, dicom_seg=True, nifti=True)
    assert s["scans_ok"] == 1 and s["n_nodules"] == 1
    (entry,) = s["scans"]
    assert "dicom_seg" not in entry and entry["nifti"] and len(entry["output_errors"]) == 1
    assert "DICOM SEG/SR" in entry["output_errors"][0] and "slices []" in entry["output_errors"][0]
    assert not (out / "dicom").exists()


def test_a_run_without_the_outputs_removes_an_earlier_runs(tmp_path, fake_models):
    """The viewer, DICOM and NIfTI folders are replaced with the table: a later run without them
    does not leave an earlier run's files that disagree with its nodules.json."""
    folder = write_dicom_series(phantom_ct(), tmp_path / "series")
    out = tmp_path / "out"
    run_detection([folder], *fake_models, out, png=False, progress=False, dicom_seg=True, html=True, nifti=True)
    assert (out / "dicom").is_dir() and (out / "viewer").is_dir() and (out / "nifti").is_dir()
    run_detection([folder], *fake_models, out, png=False, progress=False)
    assert not any((out / d).exists() for d in ("dicom", "viewer", "nifti"))


def test_no_nodule_no_seg_and_an_sr_that_says_so(tmp_path, fake_models):
    folder = write_dicom_series(phantom_ct(), tmp_path / "series")
    out = tmp_path / "out"
    s = run_detection([folder], *fake_models, out, png=False, progress=False, threshold=0.9, dicom_seg=True,
                      dicom_sr=True)
    (entry,) = s["scans"]
    assert entry["dicom_seg"] is None and entry["nodules"] == []
    import highdicom as hd

    from pydicom.sr.codedict import codes

    sr = hd.sr.srread(entry["dicom_sr"])
    assert sr.content.get_planar_roi_measurement_groups() == []
    (group,) = sr.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations(name=codes.DCM.PresenceOfProperty)
    assert evaluation.value == codes.SCT.Absent and group.finding_type == codes.SCT.Nodule
