"""Detection app: candidates from a phantom with known answers, outputs, bad inputs, real scans."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from nodulekit.data.volume import CTVolume
from nodulekit.detect import detect_scan, run_detection
from nodulekit.detect.candidates import clean_mask, seg_batch

SPACING = (2.5, 2.5, 4.0)  # x, y, z mm
ORIGIN = (-150.0, -120.0, -300.0)
NODULE_IRC = (14, 60, 40)
NODULE_MM = 8.0  # diameter


def _ellipsoid(shape, center_zyx, radii_mm):
    z, y, x = np.ogrid[tuple(slice(0, s) for s in shape)]
    sx, sy, sz = SPACING
    return sum(((g - c) * s / r) ** 2 for g, c, s, r in zip((z, y, x), center_zyx, (sz, sy, sx), radii_mm)) <= 1.0


def phantom_ct(depth: int = 28, uid: str = "1.2.3.phantom") -> CTVolume:
    """Soft tissue (100 HU) body in air with two lungs (-850 HU) and a 0 HU nodule in the right lung."""
    shape = (depth, 112, 112)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[_ellipsoid(shape, (depth / 2, 56, 56), (400, 120, 135))] = 100
    for cx in (32, 80):
        hu[_ellipsoid(shape, (depth / 2, 56, cx), (45, 70, 45))] = -850
    hu[_ellipsoid(shape, NODULE_IRC, (NODULE_MM / 2,) * 3)] = 0
    return CTVolume(hu, ORIGIN, SPACING, np.eye(3), uid, "phantom")


def fake_seg(x: np.ndarray) -> np.ndarray:
    """'Segments' the centre slice's voxels between -300 and 50 HU: the nodule and nothing else."""
    c = x[:, 3]
    return ((c > -300) & (c < 50)).astype(np.float32)[:, None]


def fake_cls(x: np.ndarray) -> np.ndarray:
    assert x.shape[1:] == (1, 32, 48, 48) and x.min() >= -1000 and x.max() <= 1000
    return np.full(len(x), 0.7, dtype=np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from nodulekit.models.checkpoint import save_cls_checkpoint, save_seg_checkpoint
    from nodulekit.models.classifier import LunaModel
    from nodulekit.models.unet import SegModel

    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cls = LunaModel()
    torch.nn.init.normal_(cls.head_linear.weight, std=0.05)  # a fresh head is zero: outputs would be 0.5
    return save_seg_checkpoint(d / "seg.pt", SegModel()), save_cls_checkpoint(d / "cls.pt", cls)


def test_seg_batch_clamps_neighbours_and_clips():
    hu = np.arange(5, dtype=np.float32)[:, None, None] * 1000 - 2000 + np.zeros((5, 4, 4), np.float32)
    x = seg_batch(hu, [0, 4])
    assert x.shape == (2, 7, 4, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, :, 0, 0], np.clip([-2000] * 4 + [-1000, 0, 1000], -1000, 1000))
    np.testing.assert_array_equal(x[1, :, 0, 0], [-1000, 0, 1000, 1000, 1000, 1000, 1000])



def test_detection_input_is_the_training_input():
    """Detection's batches and training's SegScan.context are one function: equal bytes on an int16
    memmap-like volume, at the ends (clamped neighbours) and inside, with HU outside [-1000, 1000]."""
    from nodulekit.data.seg_dataset import SegScan
    from nodulekit.data.seg_input import seg_context

    rng = np.random.default_rng(0)
    hu = rng.integers(-3000, 3000, size=(9, 8, 6)).astype(np.int16)
    scan = SegScan("u", hu, {}, {})
    zs = list(range(hu.shape[0]))
    batch = seg_batch(hu, zs)
    assert batch.dtype == np.float32 and batch.shape == (9, 7, 8, 6)
    for z in zs:
        assert scan.context(z).tobytes() == batch[z].tobytes() == seg_context(hu, z).tobytes()
    np.testing.assert_array_equal(scan.context(0, slice(2, 5), slice(1, 3)), batch[0][:, 2:5, 1:3])
    assert batch.min() == -1000 and batch.max() == 1000
    np.testing.assert_array_equal(batch[0][:4], np.repeat(batch[0][3:4], 4, axis=0))

def test_candidate_position_and_size():
    ct = phantom_ct()
    res = detect_scan(ct, fake_seg, fake_cls)
    cands = res["candidates"]
    assert len(cands) == 1
    c = cands[0]
    np.testing.assert_allclose(c.center_irc, NODULE_IRC, atol=0.3)
    expected_xyz = np.array(ORIGIN) + np.array(NODULE_IRC[::-1]) * np.array(SPACING)
    np.testing.assert_allclose(c.center_xyz, expected_xyz, atol=1.0)
    assert abs(c.diameter_mm - NODULE_MM) / NODULE_MM < 0.25
    assert c.probability == pytest.approx(0.7)
    assert 0 < res["slices_segmented"] <= ct.shape[0]


def test_candidates_outside_the_lung_are_dropped():
    ct = phantom_ct()
    ct.hu[14, 5:9, 50:54] = 0  # a 0 HU blob in the air outside the body
    assert len(detect_scan(ct, fake_seg, fake_cls)["candidates"]) == 1


def test_a_mark_running_into_the_mediastinum_is_dropped():
    """A blob between the lungs, whose mark reaches the right lung's edge (so the dilated lung mask
    lets it in), lies farther from lung air than its radius: the mediastinum, not a nodule. A nodule
    of the same size on the lung's wall is kept."""
    ct = phantom_ct()
    # the right lung's medial edge is at col 50: the blob spans cols 51-59, its centre 12.5 mm from
    # lung air, and its first columns lie within the lung mask's 5 mm dilation
    ct.hu[_ellipsoid(ct.shape, (14, 56, 55), (5, 5, 11))] = 0
    res = detect_scan(ct, fake_seg, fake_cls)
    assert res["off_lung"] == 1
    assert [round(c.center_irc[0]) for c in res["candidates"]] == [NODULE_IRC[0]]

    ct = phantom_ct()
    ct.hu[_ellipsoid(ct.shape, (14, 56, 14), (5, 5, 5))] = 0  # centred on the left lung's lateral wall
    res = detect_scan(ct, fake_seg, fake_cls)
    assert res["off_lung"] == 0 and len(res["candidates"]) == 2


def test_borders_lung_reaches_the_radius_plus_the_margin():
    from nodulekit.detect.candidates import LUNG_CONTACT_MM, Finding, borders_lung

    spacing = (1.0, 1.0, 2.0)
    lung = np.zeros((20, 40, 40), dtype=bool)
    lung[:, :, :10] = True  # air up to x = 9

    def at(x, d):
        return Finding(center_irc=(10.0, 20.0, float(x)), center_xyz=(0, 0, 0), diameter_mm=d, volume_mm3=1.0,
                       n_voxels=1, bbox=(slice(0, 1),) * 3, label=1)

    reach = 4.0 / 2 + LUNG_CONTACT_MM
    assert borders_lung(at(9 + reach, 4.0), lung, spacing)
    assert not borders_lung(at(9 + reach + 0.5, 4.0), lung, spacing)
    assert borders_lung(at(9 + reach + 0.5, 5.2), lung, spacing)
    assert not borders_lung(at(30, 4.0), np.zeros_like(lung), spacing)


def test_classifier_crops_follow_the_runners_crop_spacing():
    """A classifier trained on resampled crops gets resampled crops: the array
    :func:`nodulekit.data.crops.cls_crop` cuts around the candidate (to float32 rounding: detection
    interpolates axis by axis, training with ``map_coordinates``)."""
    from nodulekit.data.crops import cls_crop

    ct = phantom_ct()
    seen = []

    class Runner:
        crop_spacing = (1.25, 0.8, 0.8)

        def __call__(self, x):
            seen.append(x)
            return np.full(len(x), 0.3, dtype=np.float32)

    cand = detect_scan(ct, fake_seg, Runner())["candidates"][0]
    expected = cls_crop(ct.hu, ct.spacing, cand.center_irc, (32, 48, 48), (1.25, 0.8, 0.8))
    np.testing.assert_allclose(seen[0][0, 0], expected, atol=0.01)
    native = cls_crop(ct.hu, ct.spacing, cand.center_irc, (32, 48, 48))
    assert not np.array_equal(expected, native) and cand.probability == pytest.approx(0.3)


def test_classify_averages_mirror_images_of_likely_candidates():
    """A candidate whose plain crop scores views_from or more gets the mean over the crop's mirror
    images, geometric by default (arithmetic on request); one below it keeps its one view; views=1
    is the plain crop alone."""
    from nodulekit.detect.candidates import VIEW_MEAN, classify, flip_views
    from nodulekit.detect.crops import cls_crops

    ct = phantom_ct()
    (nodule,) = detect_scan(ct, fake_seg, None)["candidates"]
    z, y, x = nodule.center_irc
    found = [nodule, dataclasses.replace(nodule, center_irc=(z, y + 6, x - 9))]  # and a place beside it
    rng = np.random.default_rng(0)
    ct.hu = (ct.hu + rng.normal(0, 30, ct.hu.shape)).astype(np.float32)  # no crop is symmetric
    weights = rng.normal(size=(32, 48, 48)).astype(np.float32)  # ... nor the scoring: every view scores its own

    class Runner:
        crop_spacing = (1.25, 0.8, 0.8)
        calls = 0

        def __call__(self, x):
            Runner.calls += 1
            return 1 / (1 + np.exp(-(x[:, 0] * weights).sum(axis=(1, 2, 3)) * 1e-4))

    x = cls_crops(ct.hu, ct.spacing, [c.center_irc for c in found], (32, 48, 48), Runner.crop_spacing)
    plain = Runner()(x)
    assert len({round(float(v), 4) for v in plain}) == 2
    views = [Runner()(np.ascontiguousarray(np.flip(x, axis=a)) if a else x) for a in flip_views(8)]
    assert len({round(float(v[0]), 6) for v in views}) == 8

    geometric = {n: np.exp(np.mean(np.log(views[:n]), axis=0)) for n in (1, 2, 4, 8)}
    assert VIEW_MEAN == "geometric"
    for n in (1, 2, 4, 8):
        for mean, expected in (("geometric", geometric[n]), ("arithmetic", np.mean(views[:n], axis=0))):
            cands = [copy.copy(c) for c in found]
            classify(ct, cands, Runner(), views=n, views_from=0.0, view_mean=mean)
            np.testing.assert_allclose([c.probability for c in cands], expected, rtol=1e-6)
        cands = [copy.copy(c) for c in found]
        classify(ct, cands, Runner(), views=n, views_from=0.0)
        np.testing.assert_allclose([c.probability for c in cands], geometric[n], rtol=1e-6)
    # the geometric mean is at most the arithmetic, equal only where every view agrees
    assert np.all(geometric[8] < np.mean(views, axis=0))
    # only the likelier candidate is scored again: the other keeps its plain crop's probability
    cut = float(np.mean(plain))
    cands = [copy.copy(c) for c in found]
    classify(ct, cands, Runner(), views=8, views_from=cut)
    hi = int(np.argmax(plain))
    assert cands[hi].probability == pytest.approx(geometric[8][hi], rel=1e-6)
    assert cands[1 - hi].probability == pytest.approx(plain[1 - hi], rel=1e-6)
    # ... and views_from above every plain score costs one pass only
    Runner.calls = 0
    classify(ct, [copy.copy(c) for c in found], Runner(), views=8, views_from=1.0)
    assert Runner.calls == 1
    with pytest.raises(ValueError, match="views"):
        classify(ct, found, Runner(), views=3)
    with pytest.raises(ValueError, match="views_from"):
        classify(ct, found, Runner(), views_from=1.5)
    with pytest.raises(ValueError, match="view_mean"):
        classify(ct, found, Runner(), view_mean="median")


def test_pool_views_floors_a_view_of_zero():
    """One view at exactly 0 must not veto the others to 0 (nor give NaN): it counts as 1e-6."""
    from nodulekit.detect.candidates import pool_views

    probs = np.array([[0.0, 0.9], [0.9, 0.9]])
    pooled = pool_views(probs)
    assert np.all(np.isfinite(pooled))
    np.testing.assert_allclose(pooled, [np.sqrt(1e-6 * 0.9), 0.9])
    np.testing.assert_allclose(pool_views(probs, "arithmetic"), [0.45, 0.9])


def test_run_detection_refuses_bad_views_before_any_scan(tmp_path):
    for views, views_from, mean in ((3, 0.2, "geometric"), (8, float("nan"), "geometric"), (8, 1.5, "geometric"),
                                    (8, 0.2, "mode")):
        with pytest.raises(ValueError, match="view"):
            run_detection([tmp_path / "none.mhd"], None, None, tmp_path / "out", views=views, views_from=views_from,
                          view_mean=mean)
    assert not (tmp_path / "out").exists()


def test_specks_below_min_volume_are_dropped():
    ct = phantom_ct()
    ct.hu[14, 56, 80] = 0  # one voxel (25 mm^3) in the left lung
    assert len(detect_scan(ct, fake_seg, fake_cls, min_volume_mm3=7)["candidates"]) == 2
    assert len(detect_scan(ct, fake_seg, fake_cls, min_volume_mm3=30)["candidates"]) == 1
    # one voxel is 25 mm^3, a sphere of 3.6 mm: from a larger diameter on, only the 8 mm nodule is left
    assert len(detect_scan(ct, fake_seg, fake_cls, min_diameter_mm=3.5)["candidates"]) == 2
    assert len(detect_scan(ct, fake_seg, fake_cls, min_diameter_mm=3.7)["candidates"]) == 1


def test_run_detection_outputs_and_bad_inputs(tmp_path, models, monkeypatch):
    from nodulekit.data.ct import write_ct
    from nodulekit.deploy import runtime

    good = write_ct(phantom_ct(), tmp_path / "in" / "1.2.3.phantom.mhd")
    thin = write_ct(phantom_ct(depth=5, uid="thin"), tmp_path / "in" / "thin.mhd")
    broken = tmp_path / "in" / "broken.mhd"
    broken.write_text("not a metaimage header\n")
    monkeypatch.setattr(runtime, "load_seg_runner", lambda *a, **k: fake_seg)
    monkeypatch.setattr(runtime, "load_cls_runner", lambda *a, **k: fake_cls)
    out = tmp_path / "out"
    s = run_detection([good, thin, broken, tmp_path / "missing.nii.gz"], *models, out, progress=False)
    assert s["scans_ok"] == 1 and s["scans_failed"] == 3
    assert {f["input"] for f in s["failed"]} == {str(thin), str(broken), str(tmp_path / "missing.nii.gz")}
    rows = list(csv.reader(open(out / "nodules.csv")))
    assert rows[0] == ["seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm"]
    assert len(rows) == 2 and rows[1][0] == "1.2.3.phantom" and float(rows[1][4]) == pytest.approx(0.7)
    report = json.loads((out / "nodules.json").read_text())
    scan = report["scans"][0]
    assert scan["geometry"]["spacing_xyz"] == list(SPACING)
    assert {"lung_mask", "segmentation", "classification", "total"} <= set(scan["timings_s"])
    assert len(scan["nodules"]) == 1 and len(report["failed"]) == 3
    sizes = scan["nodules"][0]
    assert sizes["volume_equivalent_diameter_mm"] == sizes["diameter_mm"] == float(rows[1][5])
    assert sizes["diameter_mm"] <= sizes["long_axis_mm"] <= 1.5 * NODULE_MM and sizes["volume_mm3"] > 0
    assert (out / "png" / "1.2.3.phantom_0.png").stat().st_size > 5000

    s = run_detection([good], *models, tmp_path / "out3", max_png=0, progress=False)
    nodules = json.loads((tmp_path / "out3" / "nodules.json").read_text())["scans"][0]["nodules"]
    assert len(nodules) == 1 and nodules[0]["png"] is None  # listed, not drawn

    s = run_detection([good], *models, tmp_path / "out2", threshold=0.8, png=True, progress=False)
    assert s["n_candidates"] == 1 and s["n_nodules"] == 0
    assert not (tmp_path / "out2" / "png").exists() or not any((tmp_path / "out2" / "png").iterdir())


def test_untrained_models_torch_and_onnx(tmp_path, models):
    """Real runners end to end: untrained checkpoints, and the classifier also through ONNX."""
    from nodulekit.data.ct import write_ct
    from nodulekit.deploy.runtime import load_cls_runner
    from nodulekit.models.checkpoint import load_cls_model

    seg, cls = models
    model, _ = load_cls_model(cls)
    onnx_path = tmp_path / "cls.onnx"
    x = torch.rand(2, 1, 32, 48, 48) * 2 - 1
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=True, opset_version=18, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    np.testing.assert_allclose(load_cls_runner(onnx_path, "onnx")(x.numpy()), load_cls_runner(cls)(x.numpy()),
                               atol=1e-4)

    scan = write_ct(phantom_ct(depth=10), tmp_path / "p.mhd")
    s = run_detection([scan], seg, onnx_path, tmp_path / "out", cls_backend="onnx", png=False, progress=False)
    assert s["scans_ok"] == 1 and s["scans_failed"] == 0


def test_cli_detect_with_an_int8_classifier(tmp_path, models, monkeypatch, capsys):
    pytest.importorskip("openvino")
    from test_openvino import _small_calibration

    from nodulekit.cli import main
    from nodulekit.data.ct import write_ct

    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / "cache"))
    calls = _small_calibration(monkeypatch)
    seg, cls = models
    scan = write_ct(phantom_ct(depth=10), tmp_path / "p.mhd")
    assert main(["detect", str(scan), "--seg", str(seg), "--cls", str(cls), "--cls-int8", "--out",
                 str(tmp_path / "out"), "--no-png", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "out" / "nodules.json").read_text())
    assert doc["settings"]["cls_int8"] is True and doc["scans_ok"] == 1 and len(calls) == 1
    capsys.readouterr()
    # int8 runs in OpenVINO only: another classifier runtime is refused in one line naming the file
    assert main(["detect", str(scan), "--seg", str(seg), "--cls", str(cls), "--cls-int8", "--cls-backend", "onnx",
                 "--out", str(tmp_path / "out2"), "--no-png", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cls) in err[0] and "openvino" in err[0] and "Traceback" not in err[0]


@pytest.mark.slow
def test_cli_detect_on_real_scans(tmp_path, models, cptac_mhd, lidc_dicom):
    from nodulekit.cli import main

    seg, cls = models
    out = tmp_path / "out"
    rc = main(["detect", str(lidc_dicom), str(cptac_mhd), "--seg", str(seg), "--cls", str(cls), "--out", str(out),
               "--no-png", "--no-progress", "--threads", "2", "--min-volume", "100"])  # fewer crops to classify
    assert rc == 0
    report = json.loads((out / "nodules.json").read_text())
    assert report["scans_ok"] == 2 and report["scans_failed"] == 0
    uids = {s["seriesuid"] for s in report["scans"]}
    from conftest import CPTAC_UID, LIDC_UID

    assert uids == {CPTAC_UID, LIDC_UID}
    for s in report["scans"]:
        assert 0 < s["slices_segmented"] <= s["geometry"]["shape_zyx"][0]
        assert s["lung_ml"] > 100


def test_a_ring_shaped_segmentation_becomes_one_solid_candidate():
    # the U-Net often marks only the rim of a large nodule: the candidate must be the whole disc
    zz, yy, xx = np.mgrid[:5, :40, :40]
    r = np.hypot(yy - 20, xx - 20)
    ring = (r >= 8) & (r <= 10) & (zz >= 1) & (zz <= 3)
    labels, n = clean_mask(ring, None, (1.0, 1.0, 1.0))
    assert n == 1
    assert labels[2, 20, 20] == 1  # the hole is filled
    assert (labels > 0).sum() == ((r <= 10) & (zz >= 1) & (zz <= 3)).sum()


def test_a_nodule_on_a_vessel_is_split_off_as_its_own_candidate():
    from nodulekit.detect.candidates import blob_peaks

    # a 60 mm vessel of radius 1.5 mm with a 4 mm-radius nodule on its side, 0.5 mm voxels
    zz, yy, xx = np.mgrid[:40, :40, :140] * 0.5
    vessel = np.hypot(zz - 10, yy - 10) <= 1.5
    nodule = np.sqrt((zz - 10) ** 2 + (yy - 14) ** 2 + (xx - 35) ** 2) <= 4.0
    peaks = blob_peaks(vessel | nodule, (0.5, 0.5, 0.5))
    (center, radius), rest = peaks[0], peaks[1:]
    np.testing.assert_allclose(np.array(center) * 0.5, (10, 14, 35), atol=0.6)
    assert radius == pytest.approx(4.0, abs=0.6)
    assert all(r < 2.0 for _, r in rest)  # the vessel's own blobs are thin
    assert blob_peaks(np.zeros((5, 5, 5), bool), (1, 1, 1)) == []

    # as candidates: the nodule is one blob, measured without the vessel; the vessel gives thin pieces
    from nodulekit.detect.candidates import measure, split_blobs

    (box, mask, peak), *pieces = split_blobs(vessel | nodule, (0.5, 0.5, 0.5))
    assert peak is None and all(p is not None for _, _, p in pieces)
    volume, diameter, long_axis = measure(mask, (0.5, 0.5, 0.5))
    assert diameter == pytest.approx(8.0, abs=0.8) and long_axis == pytest.approx(8.0, abs=1.2)
    assert (mask & ~nodule[box]).sum() <= 0.1 * mask.sum()  # little of the vessel in it


def test_the_default_path_finds_what_the_float_path_finds(tmp_path, monkeypatch):
    """``auto`` (OpenVINO, or ONNX Runtime, from a cached export; lung-box crops) against the
    PyTorch float path on whole slices: the same candidates, probabilities within 1e-4."""
    from nodulekit.deploy.runtime import load_runner, resolve_backend
    from nodulekit.detect.candidates import seg_batch
    from nodulekit.detect.lung_mask import lung_mask
    from nodulekit.models.checkpoint import save_cls_checkpoint, save_seg_checkpoint
    from nodulekit.models.classifier import LunaModel
    from nodulekit.models.unet import SegModel

    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / "cache"))
    ct = phantom_ct()
    torch.manual_seed(0)
    seg, cls = SegModel().eval(), LunaModel().eval()
    torch.nn.init.normal_(cls.head_linear.weight, std=0.002)
    with torch.no_grad():
        # an untrained U-Net's logits all sit near 0: spread them, and put the threshold where the
        # top 2 % of the lung's pixels are marked (a few dozen candidates)
        seg.input_batchnorm.running_var.fill_(400.0 ** 2)
        seg.unet.last.weight *= 50.0
        seg.unet.last.bias *= 50.0
        logits = seg.unet(seg.input_batchnorm(torch.from_numpy(seg_batch(ct.hu, range(ct.shape[0])))))[:, 0]
        lung = torch.from_numpy(lung_mask(ct.hu, ct.spacing))
        seg.unet.last.bias -= torch.quantile(logits[lung], 0.98)
    seg_path = save_seg_checkpoint(tmp_path / "seg.pt", seg)
    cls_path = save_cls_checkpoint(tmp_path / "cls.pt", cls)

    def whole_slices(runner):
        return lambda x: runner(x)  # no unet_depth: the float path of old, every slice whole

    ref = detect_scan(ct, whole_slices(load_runner(seg_path, "seg", "torch")), load_runner(cls_path, "cls", "torch"),
                      min_volume_mm3=60)
    fast_seg = load_runner(seg_path, "seg", "auto")
    assert type(fast_seg).__name__ == ("OpenVinoRunner" if resolve_backend(seg_path) == "openvino" else "OnnxRunner")
    got = detect_scan(ct, fast_seg, load_runner(cls_path, "cls", "auto"), min_volume_mm3=60)
    assert 5 <= len(ref["candidates"]) == len(got["candidates"])
    for a, b in zip(ref["candidates"], got["candidates"]):
        assert a.center_irc == pytest.approx(b.center_irc, abs=1e-6) and a.n_voxels == b.n_voxels
        assert a.probability == pytest.approx(b.probability, abs=1e-4)


@pytest.mark.parametrize("center", [(5, 10, 12), (0, 0, 0), (19, 29, 39), (2, 25, 3)])
def test_png_planes_cut_the_findings_own_voxels(center):
    """A nodule's PNG outlines its own voxels (``region``): each plane equals the same plane of the
    region pasted into a full volume, also where the plane misses the region or leaves the volume."""
    from nodulekit.detect.render import _region_plane, _window

    rng = np.random.default_rng(sum(center))
    shape = (20, 30, 40)
    box = (slice(3, 9), slice(8, 20), slice(10, 16))
    region = (box, rng.random((6, 12, 6)) > 0.5)
    full = np.zeros(shape, dtype=bool)
    full[box] = region[1]
    zc, yc, xc = center
    zs, ys, xs = _window(zc, 4, shape[0]), _window(yc, 6, shape[1]), _window(xc, 6, shape[2])
    for view in ((zc, ys, xs), (zs, yc, xs), (zs, ys, xc)):
        assert np.array_equal(_region_plane(region, view, shape), full[view])


def test_a_reused_renderer_draws_what_a_fresh_one_draws(tmp_path):
    """The run's one figure, reused from nodule to nodule, gives each PNG the pixels a figure of its
    own gives: a big field in the middle first, then a nodule at the volume's corner (a smaller,
    clipped field) and one whose outline lies outside its planes."""
    from PIL import Image

    from nodulekit.detect.candidates import find_candidates
    from nodulekit.detect.render import NoduleRenderer, render_nodule

    ct = phantom_ct(depth=40)
    labels = np.zeros(ct.hu.shape, dtype=np.int32)
    labels[18:23, 60:70, 60:70] = 1
    labels[0:3, 0:4, 0:4] = 2
    labels[30:33, 100:104, 20:24] = 3
    found = sorted(find_candidates(ct.hu, labels, 3, ct), key=lambda c: c.label)
    assert [c.label for c in found] == [1, 2, 3]
    found[2].center_irc = (10.0, 30.0, 80.0)  # its planes miss its voxels: no outline
    with NoduleRenderer() as renderer:
        reused = [renderer.render(ct, labels, c, tmp_path / f"reused{c.label}.png") for c in found]
    for c, path in zip(found, reused):
        fresh = render_nodule(ct, labels, c, tmp_path / f"fresh{c.label}.png")
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(fresh))), c.label
