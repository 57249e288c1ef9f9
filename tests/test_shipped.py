"""The weights that ship with the package: their manifest, their hashes, and ``detect`` without
``--seg``/``--cls``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nodulekit.errors import InputError
from nodulekit.models import shipped
from nodulekit.models.checkpoint import load_cls_model, load_seg_model, save_cls_checkpoint, save_seg_checkpoint
from nodulekit.models.classifier import LunaModel
from nodulekit.models.unet import SegModel


def test_the_package_ships_weights_that_match_their_manifest():
    doc = shipped.read_manifest()
    for kind, loader in (("seg", load_seg_model), ("cls", load_cls_model)):
        path = shipped.shipped_model(kind)
        assert path.parent == shipped.WEIGHTS_DIR
        entry = doc["files"][kind]
        assert entry["sha256"] == shipped.sha256(path) and entry["bytes"] == path.stat().st_size
        model, _ = loader(path)
        assert sum(p.numel() for p in model.parameters()) == entry["params"]
        assert entry["bytes"] < 8 * 2 ** 20  # a few MB, inside the wheel
    # self-describing: the recipe that made them, its time and what it measured
    assert doc["recipe"]["command"] == "make weights"
    assert doc["seconds"] > 0 and doc["trained_on"]
    assert 0.0 <= doc["held_out"]["cpm"] <= 1.0 and doc["held_out"]["n_nodules"] > 0
    # strict JSON: no NaN slipped in
    json.loads(json.dumps(doc), parse_constant=lambda c: pytest.fail(f"manifest holds {c}"))


@pytest.fixture
def pair(tmp_path):
    seg, cls = tmp_path / "seg.pt", tmp_path / "cls.pt"
    save_seg_checkpoint(seg, SegModel())
    save_cls_checkpoint(cls, LunaModel())
    return seg, cls


def test_install_writes_hashes_and_a_damaged_file_is_refused(tmp_path, pair):
    folder = tmp_path / "weights"
    doc = shipped.install_weights(*pair, {"recipe": {"command": "test"}, "seconds": 1.0}, folder)
    assert doc["files"]["seg"]["params"] == 118_271
    for kind in shipped.KINDS:
        assert shipped.shipped_model(kind, folder) == folder / f"{kind}.pt"
    # one flipped byte: refused with the file named, never loaded
    data = bytearray((folder / "cls.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "cls.pt").write_bytes(bytes(data))
    with pytest.raises(InputError, match="cls.pt: does not match the SHA-256"):
        shipped.shipped_model("cls", folder)
    # a seg file given as the classifier is refused before anything is copied
    with pytest.raises(InputError, match="not a LunaModel"):
        shipped.install_weights(pair[0], pair[0], {}, tmp_path / "other")
    assert not (tmp_path / "other" / shipped.MANIFEST).exists()


def test_no_or_bad_manifest_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="no shipped weights.*--seg and --cls"):
        shipped.shipped_model("seg", tmp_path)
    (tmp_path / shipped.MANIFEST).write_text("{not json")
    with pytest.raises(InputError, match="unreadable weights manifest"):
        shipped.shipped_model("seg", tmp_path)
    (tmp_path / shipped.MANIFEST).write_text(json.dumps({"files": {"seg": {"file": "../seg.pt", "sha256": "0"}}}))
    with pytest.raises(InputError, match="lists no seg and cls"):
        shipped.shipped_model("seg", tmp_path)
    (tmp_path / shipped.MANIFEST).write_text(json.dumps({"files": {k: {"file": "../x.pt"} for k in shipped.KINDS}}))
    with pytest.raises(InputError, match="missing"):
        shipped.shipped_model("cls", tmp_path)


def test_detect_without_models_uses_the_shipped_weights(tmp_path, synth_data, capsys):
    from nodulekit.cli import main

    scan = sorted((synth_data / "subset0").glob("*.mhd"))[0]
    out = tmp_path / "det"
    assert main(["detect", str(scan), "--out", str(out), "--no-png", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"models: {shipped.WEIGHTS_DIR / 'seg.pt'} and {shipped.WEIGHTS_DIR / 'cls.pt'}" in printed
    assert "(shipped with nodulekit)" in printed
    doc = json.loads((out / "nodules.json").read_text())
    assert doc["settings"]["seg"] == str(shipped.WEIGHTS_DIR / "seg.pt")
    assert doc["settings"]["cls"] == str(shipped.WEIGHTS_DIR / "cls.pt")
    assert all(math.isfinite(n["probability"]) for n in doc["scans"][0]["nodules"])


def test_the_release_recipe_is_the_demos_training_on_more_scans_for_longer():
    from nodulekit.demo import DemoConfig
    from nodulekit.release import RELEASE_SEED, ReleaseConfig

    rel, demo = ReleaseConfig(), DemoConfig.for_mode(quick=False)
    d = rel.demo()
    assert d.seed == RELEASE_SEED not in (demo.seed, 1)  # neither the demo's draw nor the independent one
    assert d.scans >= 2 * demo.scans and round(d.val_fraction * d.scans) == rel.val_scans
    seg, cls = d.seg_settings(), d.cls_settings()
    assert seg["epochs"] * seg["steps_per_epoch"] >= 2 * demo.seg_epochs * demo.seg_steps
    assert cls["epochs"] * cls["steps_per_epoch"] >= 2 * demo.cls_epochs * 60
    assert cls["detector_every"] == 1 and cls["hard_pool"] == 1024  # scored before every epoch, as shipped
    assert "fn_weight" not in seg  # training's loss (SegTrainConfig.fn_weight), as the demo's
    assert not d.rknn


def test_weights_cli_refuses_a_split_with_nothing_to_train_on(tmp_path, capsys):
    from nodulekit.cli import main

    assert main(["weights", "--out", str(tmp_path / "w"), "--scans", "4", "--val-scans", "4"]) != 0
    err = capsys.readouterr().err
    assert "--val-scans: 4 held out of 4 scans leaves none to train on" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_run_left_uninstalled_records_itself_beside_its_models(tmp_path, monkeypatch):
    import json

    from nodulekit import demo
    from nodulekit.demo import StageResult
    from nodulekit.release import RUN_INFO, ReleaseConfig, build_weights, install_run

    # the stages stand in (training is what the demo's tests cover): each hands back what the next reads
    pair = {kind: shipped.shipped_model(kind) for kind in ("seg", "cls")}
    monkeypatch.setattr(demo, "data_stage", lambda cfg, out: StageResult({}, {"data": out}))
    monkeypatch.setattr(demo, "train_seg_stage", lambda cfg, out, files: StageResult(
        {"best": {"dice": 0.5}}, {"checkpoint": pair["seg"]}))
    monkeypatch.setattr(demo, "mine_stage", lambda cfg, out, files, ckpt: StageResult({}, {"candidates": out}))
    monkeypatch.setattr(demo, "train_cls_stage", lambda cfg, out, files, cands: StageResult(
        {"best": {"auc": 0.9}}, {"checkpoint": pair["cls"]}))
    monkeypatch.setattr(demo, "detect_stage", lambda cfg, out, files, models: StageResult({}, {"csv": out}))
    monkeypatch.setattr(demo, "evaluate_stage", lambda out, files, csv: StageResult(
        {"cpm": 0.8, "n_scans": 4, "n_nodules": 12}, {}))
    out = tmp_path / "run"
    info = build_weights(ReleaseConfig(out=str(out), install=False, seed=7))
    record = json.loads((out / RUN_INFO).read_text())
    assert record.pop("checkpoints") == {kind: str(path.resolve()) for kind, path in pair.items()}
    assert record == json.loads(json.dumps(info))
    assert info["recipe"]["seed"] == 7 and info["held_out"]["cpm"] == 0.8 and info["training"]["cls"] == {"auc": 0.9}
    doc = install_run(out, tmp_path / "pkg")
    assert doc["recipe"]["seed"] == 7 and doc["files"]["seg"]["sha256"] == shipped.sha256(pair["seg"])


def test_a_judged_run_installs_as_it_was_trained(tmp_path, capsys):
    import json
    import shutil

    from nodulekit.cli import main
    from nodulekit.release import RUN_INFO, install_run

    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    with pytest.raises(InputError, match="weights.json.*not the folder of a finished"):
        install_run(run, tmp_path / "pkg")
    info = {"recipe": {"command": "make weights", "seed": 101}, "seconds": 1200.0,
            "held_out": {"cpm": 0.9, "n_scans": 4, "n_nodules": 12}}
    (run / RUN_INFO).write_text(json.dumps(info))
    with pytest.raises(InputError, match="holds no recipe and checkpoints"):
        install_run(run, tmp_path / "pkg")
    checkpoints = {kind: str(run / "models" / f"{kind}.pt") for kind in ("seg", "cls")}
    (run / RUN_INFO).write_text(json.dumps({**info, "checkpoints": checkpoints}))
    with pytest.raises(InputError, match="seg.pt.*checkpoint is gone"):
        install_run(run, tmp_path / "pkg")
    for kind in ("seg", "cls"):
        shutil.copyfile(shipped.shipped_model(kind), checkpoints[kind])
    doc = install_run(run, tmp_path / "pkg")
    on_disk = json.loads((tmp_path / "pkg" / shipped.MANIFEST).read_text())
    assert on_disk == doc and doc["recipe"] == info["recipe"] and doc["held_out"] == info["held_out"]
    assert doc["files"]["cls"]["sha256"] == shipped.sha256(run / "models" / "cls.pt")
    (run / RUN_INFO).write_text("{not json")
    assert main(["weights", "--install-from", str(run)]) != 0
    err = capsys.readouterr().err
    assert "weights.json" in err and "unreadable run record" in err and "Traceback" not in err


def test_the_model_card_shows_every_mark_above_the_threshold(tmp_path):
    import sys

    sys.path.insert(0, str(shipped.WEIGHTS_DIR.parents[3] / "scripts"))
    try:
        import model_card
    finally:
        sys.path.pop(0)
    entry = {"params": 1, "bytes": 2, "sha256": "ab" * 32}
    manifest = {"recipe": {"command": "make weights", "seg_epochs": 1, "seg_steps": 2, "mine_slices": 3,
                           "cls_epochs": 4, "cls_steps": 5, "cls_detector_from": 2},
                "trained_on": "synthetic", "seconds": 600.0, "stage_seconds": {"train_seg": 300.0},
                "created": "2026-12-06", "held_out": {"cpm": 0.9, "n_scans": 4, "n_nodules": 12},
                "files": {"seg": entry, "cls": entry}}
    froc = {"cpm": 0.812, "cpm_ci": [0.7, 0.9], "n_scans": 30, "n_nodules": 108,
            "operating_points": {"at_threshold": {"true_positives": 90, "fps_per_scan": 3.25}}}
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    nodule = {"probability": 0.93, "center_xyz": [1.0, 2.0, 3.0], "long_axis_mm": 6.5, "png": str(png)}
    real = {"scans": [{"input": "/x/LIDC-IDRI-0002_dicom", "seriesuid": "1.2.3.444455556666", "geometry":
                       {"shape_zyx": [12, 512, 512]}, "nodules": [nodule, {**nodule, "probability": 0.4}]}]}
    card = tmp_path / "docs" / "model-card.md"
    text = model_card.render(manifest, froc, real, card.parent / "img" / "mc", card, None, 0.5)
    assert "CPM **0.812** (95 % CI 0.700-0.900) on 30 scans with 108 nodules" in text
    assert "90/108 nodules found at 3.2 false marks per scan" in text
    assert "### LIDC-IDRI-0002_dicom (12 slices): 1 mark(s) above 0.5" in text
    assert "![mark 0](img/mc/444455556666_0.png)" in text
    assert (card.parent / "img" / "mc" / "444455556666_0.png").is_file()
    assert "CC BY 3.0" in text and "Not a medical device" in text and "synthetic CT only" in text
    assert "make seeds" not in text and "mirror images" not in text
    views = model_card.render(manifest, froc, {**real, "settings": {"views": 8, "views_from": 0.2}},
                              card.parent / "img" / "mc", card, None, 0.5)
    assert "scores at 0.2 or more gets the arithmetic mean over 8 mirror images" in views
    views = model_card.render(manifest, froc, {**real, "settings": {"views": 8, "views_from": 0.2,
                                                                    "view_mean": "geometric"}},
                              card.parent / "img" / "mc", card, None, 0.5)
    assert "scores at 0.2 or more gets the geometric mean over 8 mirror images" in views
    seeds = {"base": "demo", "data_seed": 0, "independent": {"n_scans": 30, "n_nodules": 100},
             "recipes": [{"name": "demo", "overrides": {}, "cpm_mean": 0.558, "cpm_sd": 0.0172,
                          "seeds": [{"cpm": 0.561}, {"cpm": 0.573}, {"cpm": 0.539}]}]}
    text = model_card.render(manifest, froc, real, card.parent / "img" / "mc", card, None, 0.5, seeds=seeds)
    assert "| demo | none (the demo's) | 3 | 0.558 | 0.017 | 0.561 / 0.573 / 0.539 |" in text


def test_the_shipped_classifier_in_int8_decides_as_in_fp32(tmp_path, monkeypatch):
    """``detect --cls-int8``: the shipped classifier quantized on the default synthetic calibration
    (seed 7), checked against its fp32 OpenVINO form on crops of another draw (seed 11: nodules and
    the vessels, bronchi and forks detection hands the classifier). Tolerances: the same decision
    at 0.5 on at least 97 % of the crops, probabilities within 0.03 on average and 0.15 at most
    (what detection keeps is the decision at 0.5; on the independent draw int8 matches fp32's CPM
    within its confidence interval)."""
    pytest.importorskip("openvino")
    from nodulekit.deploy.ptq import synthetic_cls_crops
    from nodulekit.deploy.runtime import load_cls_runner
    from nodulekit.models.shipped import shipped_model

    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / "cache"))
    cls = shipped_model("cls")
    fp32 = load_cls_runner(cls, "openvino", threads=2)
    int8 = load_cls_runner(cls, "openvino", threads=2, int8=True)
    x = synthetic_cls_crops(fp32.crop_spacing, fp32.context, n=96, scans=2, seed=11)
    p, q = fp32(x), int8(x)
    assert ((p >= 0.5) == (q >= 0.5)).mean() >= 0.97
    assert np.abs(p - q).mean() <= 0.03 and np.abs(p - q).max() <= 0.15
