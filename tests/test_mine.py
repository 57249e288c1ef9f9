"""The detector's own candidates on training scans, and the classifier's use of them."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from tests.test_detect import NODULE_IRC, fake_seg, phantom_ct


def _dataset(root, depth=28):
    """Three phantom scans (one nodule-like blob each), the first annotated, plus a broken one."""
    from nodulekit.data.ct import write_ct
    from nodulekit.data.luna import Annotation, write_annotations

    cts = [phantom_ct(depth=depth, uid=f"1.2.{k}") for k in range(3)]
    for ct in cts:
        write_ct(ct, root / "subset0" / f"{ct.seriesuid}.mhd")
    (root / "subset0" / "1.2.9.mhd").write_text("not a metaimage header\n")
    center = tuple(cts[0].voxel_to_world(np.array([NODULE_IRC], float))[0])
    write_annotations(root / "annotations.csv", [Annotation("1.2.0", center, 8.0)])
    return cts


def _rows(path):
    with open(path) as fh:
        return list(csv.reader(fh))


def test_clear_of_findings():
    from nodulekit.detect.mine import clear_of_findings

    findings = [(np.zeros(3), 2.0), (np.array([100.0, 0, 0]), 10.0)]
    assert not clear_of_findings((5.9, 0, 0), findings)  # r + 4 mm reaches farther than 1.5 r for small ones
    assert clear_of_findings((6.1, 0, 0), findings)
    assert not clear_of_findings((100, 14.9, 0), findings)  # 1.5 r for large ones
    assert clear_of_findings((100, 15.1, 0), findings) and clear_of_findings((0, 0, 50), [])


def test_mine_writes_non_nodules_skips_bad_scans_and_windows(tmp_path, monkeypatch):
    from nodulekit.deploy import runtime
    from nodulekit.detect.mine import mine_candidates
    from nodulekit.errors import InputError

    cts = _dataset(tmp_path, depth=44)
    monkeypatch.setattr(runtime, "load_seg_runner", lambda *a, **k: fake_seg)
    s = mine_candidates(tmp_path, "seg.pt", tmp_path / "out" / "mined.csv", progress=False)
    assert s["scans_ok"] == 3 and [f["seriesuid"] for f in s["failed"]] == ["1.2.9"]
    assert "1.2.9.mhd" in s["failed"][0]["error"]
    assert (s["candidates"], s["negatives"], s["near_findings"]) == (3, 2, 1)  # the annotated blob is left out
    rows = _rows(tmp_path / "out" / "mined.csv")
    assert rows[0] == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert sorted(r[0] for r in rows[1:]) == ["1.2.1", "1.2.2"] and {r[4] for r in rows[1:]} == {"0"}
    blob = cts[1].voxel_to_world(np.array([NODULE_IRC], float))[0]
    assert np.allclose([float(v) for v in rows[1][1:4]], blob, atol=0.6)
    assert not list((tmp_path / "out").glob(".*tmp"))

    # a window of middle slices keeps world coordinates; one that misses the blob finds nothing
    s = mine_candidates(tmp_path, "seg.pt", tmp_path / "w.csv", uids=["1.2.1"], max_slices=20, progress=False)
    assert s["negatives"] == 1 and np.allclose([float(v) for v in _rows(tmp_path / "w.csv")[1][1:4]],
                                               [float(v) for v in rows[1][1:4]], atol=1e-3)
    assert mine_candidates(tmp_path, "seg.pt", tmp_path / "w.csv", uids=["1.2.1"], max_slices=8,
                           progress=False)["candidates"] == 0  # slices 18-25 of 44; the blob is on 13-15
    with pytest.raises(InputError, match="1.2.77"):
        mine_candidates(tmp_path, "seg.pt", tmp_path / "x.csv", uids=["1.2.77"], progress=False)


def test_cli_mine_skips_the_held_out_scans(tmp_path, monkeypatch):
    from nodulekit.cli import main
    from nodulekit.data.split import train_val_split
    from nodulekit.deploy import runtime

    _dataset(tmp_path)
    (tmp_path / "subset0" / "1.2.9.mhd").unlink()
    monkeypatch.setattr(runtime, "load_seg_runner", lambda *a, **k: fake_seg)
    out = tmp_path / "mined.csv"
    assert main(["mine", "--data", str(tmp_path), "--seg", "seg.pt", "--out", str(out), "--val-fraction", "0.34",
                 "--no-progress"]) == 0
    train, val = train_val_split(["1.2.0", "1.2.1", "1.2.2"], 0.34)
    assert len(val) == 1 and not {r[0] for r in _rows(out)[1:]} & set(val)


def test_detector_negatives_are_drawn_for_training_only(tmp_path):
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.cls_dataset import build_cls_datasets
    from nodulekit.data.luna import Candidate, write_candidates

    _dataset(tmp_path)
    (tmp_path / "subset0" / "1.2.9.mhd").unlink()
    ct = phantom_ct()
    world = lambda irc: tuple(ct.voxel_to_world(np.array([irc], float))[0])  # noqa: E731
    # the folder's own table: the blobs and a few lung points; the detector's: other points
    write_candidates(tmp_path / "candidates.csv", [Candidate(f"1.2.{k}", world(NODULE_IRC), True) for k in range(3)]
                     + [Candidate(f"1.2.{k}", world((14, 56, 20 + k)), False) for k in range(3)])
    detector = tmp_path / "detector.csv"
    write_candidates(detector, [Candidate(f"1.2.{k}", world((10 + k, 40, 80)), False) for k in range(3)])
    train, val = build_cls_datasets(tmp_path, val_fraction=0.34, samples_per_epoch=40, seed=0,
                                    cache=VolumeCache(tmp_path / "cache"), detector_candidates=detector)
    val_uids = {s.seriesuid for s in val.samples}
    assert train.detector_neg and not {s.seriesuid for s in train.detector_neg} & val_uids
    key = lambda t: t.numpy().tobytes()  # noqa: E731
    mined = {key(train.crops(s)) for s in train.detector_neg}
    assert not {key(train[i][0]) for i in range(1, 40, 2)} & mined  # none before set_detector_share
    train.set_detector_share(1.0)
    assert {key(train[i][0]) for i in range(1, 40, 2)} <= mined
    assert all(train[i][1] == 0 for i in range(1, 40, 2)) and train[0][1] == 1
    train.set_detector_share(0.5)
    drawn = [key(train[i][0]) in mined for i in range(1, 400, 2)]
    assert 0.35 < np.mean(drawn) < 0.65
    with pytest.raises(ValueError, match="detector-negative share"):
        train.set_detector_share(-0.1)
    assert isinstance(train[1][0], torch.Tensor)
