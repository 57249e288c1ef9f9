"""The synthetic LUNA16-format generator: layout, determinism, geometry of labels, realism bounds."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from nodulekit.data.synth import generate_dataset, generate_scan
from nodulekit.data.synth.scan import render_scan

SMALL = dict(size=128, max_slices=24)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _read(path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def test_layout_and_headers(synth_data):
    assert _rows(synth_data / "annotations.csv")[0] == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert _rows(synth_data / "annotations_excluded.csv")[0] == ["seriesuid", "coordX", "coordY", "coordZ",
                                                                 "diameter_mm"]
    assert _rows(synth_data / "candidates.csv")[0] == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    uids = (synth_data / "seriesuids.csv").read_text().split()
    assert len(uids) == 4 and len(set(uids)) == 4
    for uid in uids:
        assert uid.startswith("1.3.6.1.4.1.55555.0.")
        assert (synth_data / "subset0" / f"{uid}.mhd").is_file() and (synth_data / "subset0" / f"{uid}.raw").is_file()
        assert (synth_data / "masks" / f"{uid}.zraw").is_file()
    meta = json.loads((synth_data / "synth.json").read_text())
    assert meta["summary"]["scans"] == 4 and len(meta["scans"]) == 4


def test_annotations_fall_inside_their_labels(synth_data):
    rows = _rows(synth_data / "annotations.csv")[1:]
    assert rows, "every scan draws at least one nodule"
    by_uid: dict[str, list] = {}
    for r in rows:
        by_uid.setdefault(r[0], []).append(r)
    for uid, ann in by_uid.items():
        img, hu = _read(synth_data / "subset0" / f"{uid}.mhd")
        mimg, labels = _read(synth_data / "masks" / f"{uid}.mhd")
        assert hu.dtype == np.int16 and labels.dtype == np.uint16 and labels.shape == hu.shape
        assert mimg.GetOrigin() == img.GetOrigin() and mimg.GetDirection() == img.GetDirection()
        assert labels.max() == len(ann)
        for k, r in enumerate(ann, start=1):
            xyz = tuple(float(v) for v in r[1:4])
            ijk = mimg.TransformPhysicalPointToIndex(xyz)
            assert labels[ijk[2], ijk[1], ijk[0]] == k
            assert 3.0 <= float(r[4]) <= 30.0


def test_class_balance_and_excluded(synth_data):
    cand = _rows(synth_data / "candidates.csv")[1:]
    pos = sum(r[4] == "1" for r in cand)
    neg = sum(r[4] == "0" for r in cand)
    assert pos == len(_rows(synth_data / "annotations.csv")) - 1
    assert neg > 30 * pos and neg >= 4 * 100
    for r in _rows(synth_data / "annotations_excluded.csv")[1:]:
        assert float(r[4]) < 3.0


def test_same_seed_same_bytes(tmp_path):
    a = generate_scan(3, 1, **SMALL)
    b = generate_scan(3, 1, **SMALL)
    assert np.array_equal(a.ct.hu, b.ct.hu) and np.array_equal(a.labels, b.labels)
    assert a.negatives == b.negatives and a.ct.seriesuid == b.ct.seriesuid
    c = generate_scan(4, 1, **SMALL)
    assert not np.array_equal(a.ct.hu, c.ct.hu) if a.ct.shape == c.ct.shape else True
    generate_dataset(tmp_path / "a", 2, 5, progress=False, **SMALL)
    generate_dataset(tmp_path / "b", 2, 5, progress=False, workers=2, **SMALL)
    for name in ("annotations.csv", "candidates.csv", "annotations_excluded.csv", "seriesuids.csv", "synth.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    uid = (tmp_path / "a" / "seriesuids.csv").read_text().split()[0]
    for sub in ("subset0", "masks"):
        for ext in ("mhd", "raw" if sub == "subset0" else "zraw"):
            f = f"{sub}/{uid}.{ext}"
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_hu_statistics_and_geometry():
    s = generate_scan(0, 2, size=256, max_slices=40)
    hu = s.ct.hu.astype(np.float32)
    assert hu.dtype == np.float32 and s.ct.hu.dtype == np.int16
    sx, sy, sz = s.ct.spacing
    assert sx == sy and 0.55 * 2 <= sx <= 0.95 * 2 + 1e-9 and 0.6 <= sz <= 2.5
    assert s.ct.shape[0] <= 40 and s.ct.shape[1:] == (256, 256)
    assert s.ct.origin[2] < 0
    # lung parenchyma: dark voxels that are not airway lumen
    from scipy import ndimage as ndi

    smooth = ndi.uniform_filter(hu, (1, 5, 5))
    lung = (smooth > -950) & (smooth < -700)
    assert -900 < np.median(hu[lung]) < -800
    assert hu.min() >= -1024 and np.percentile(hu, 99.9) > 300  # bone
    for k, n in enumerate(s.nodules, start=1):
        if n.kind == "solid" and n.diameter_mm >= 6:
            core = ndi.binary_erosion(s.labels == k, iterations=1)
            if core.any():
                assert -60 < np.median(hu[core]) < 130


@pytest.mark.parametrize("flip", ["x", "y", "z"])
def test_flipped_direction_keeps_labels_in_place(flip):
    s = render_scan(1, 0, flip=flip, **SMALL)
    ref = render_scan(1, 0, flip="", **SMALL)
    k = "xyz".index(flip)
    assert s.ct.direction[k, k] == -1.0
    assert np.array_equal(np.flip(s.labels, axis=2 - k), ref.labels)
    for lab, n in enumerate(s.nodules, start=1):
        irc = np.rint(s.ct.world_to_voxel(n.center_xyz)).astype(int)
        assert s.labels[tuple(irc)] == lab
    # the first stored voxel along the flipped axis is the last one of the unflipped scan
    expected = list(ref.ct.origin)
    expected[k] += ref.ct.spacing[k] * (ref.ct.shape[2 - k] - 1)
    np.testing.assert_allclose(s.ct.origin, expected)


def test_cli_summary(tmp_path, capsys):
    from nodulekit.cli import main

    rc = main(["synth", "--out", str(tmp_path / "d"), "--scans", "1", "--seed", "2", "--size", "128",
               "--max-slices", "16", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "nodules" in out and "candidates" in out and "time" in out
    assert (tmp_path / "d" / "candidates.csv").is_file()


def test_synth_modules_do_not_import_their_package():
    """The package's __init__ imports its modules: one of them importing the package back is a cycle."""
    import ast
    from pathlib import Path

    import nodulekit.data.synth as synth

    for path in Path(synth.__file__).parent.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "nodulekit.data.synth", path.name


def test_lobar_hila_branch_near_the_hilum_and_add_lymph_nodes_as_negatives():
    import nodulekit.data.synth.hila as hila
    from nodulekit.data.synth.anatomy import sample_anatomy
    from nodulekit.data.synth.skeleton import hila as hilum_points

    s = generate_scan(0, 2, size=256, max_slices=60, hila="lobar")
    assert generate_scan(0, 2, size=256, max_slices=60, hila="lobar").negatives == s.negatives  # deterministic
    simple = generate_scan(0, 2, size=256, max_slices=60)
    assert not np.array_equal(simple.ct.hu, s.ct.hu)
    # the annotations still fall in their labels, and the scan is a chest
    for lab, n in enumerate(s.nodules, start=1):
        assert s.labels[tuple(np.rint(s.ct.world_to_voxel(n.center_xyz)).astype(int))] == lab
    assert -900 < np.median(s.ct.hu[(s.ct.hu > -950) & (s.ct.hu < -700)]) < -750

    # lobes: the right lung has three, the left two; a lower-lobe point lies below the upper lobe's
    an = sample_anatomy(np.random.default_rng(0))
    an.cx = an.yc = an.z0 = 0.0
    pts = np.stack([np.full(3, -60.0), np.zeros(3), np.array([0.9, 0.5, 0.1]) * an.H], axis=1)
    pts[1, 1] = -0.5 * an.Ba  # anterior, between the fissures: middle lobe on the right
    assert list(hila.lobe_of(an, pts, -1)) == [hila.UPPER, hila.MIDDLE, hila.LOWER]
    assert list(hila.lobe_of(an, pts, 1)) == [hila.UPPER, hila.UPPER, hila.LOWER]

    # the artery splits into one trunk per lobe within 3 cm of its hilum (the right one after its
    # interlobar trunk)
    rng = np.random.default_rng(1)
    hub = hilum_points(an)["artery_r"]
    lung = np.stack([rng.uniform(-130, -30, 900), rng.uniform(-80, 80, 900), rng.uniform(0.05, 0.95, 900) * an.H], 1)
    segs = hila.lobar_tree(rng, hub, 7.0, lung, hila.lobe_of(an, lung, -1), -1)
    roots = [s for s in segs if np.allclose(s.p0, hub)]  # the upper lobe's trunk and the interlobar one
    assert len(roots) == 2 and all(np.linalg.norm(s.p1 - hub) < 30 for s in roots)
    forks = [[s for s in segs if np.allclose(s.p0, r.p1)] for r in roots]
    assert sorted(len(f) for f in forks) == [1, 2]  # the interlobar trunk splits into middle and lower
    # Murray's law: the trunks' cubed radii add up to their parent's
    assert sum(s.r0 ** 3 for s in roots) == pytest.approx(7.0 ** 3)
    k = [len(f) for f in forks].index(2)
    assert sum(s.r0 ** 3 for s in forks[k]) == pytest.approx(roots[k].r1 ** 3)

    # lymph nodes: soft tissue against the lobar trunks' roots, never out in the lung (where a node
    # would be a juxtavascular nodule's double); they join the class-0 candidates
    assert len(s.negatives) > len(simple.negatives)
    nodes = hila.lymph_nodes(np.random.default_rng(2), segs, [], 40.0)
    assert 2 <= len(nodes) <= 8 and all(20 < hu < 70 and 2 <= n.r0 <= 6 for n, hu in nodes)
    assert all(np.linalg.norm((n.p0 + n.p1) / 2 - hub) < 25 for n, _ in nodes)


def test_hila_choice_is_checked_and_recorded(tmp_path, capsys):
    from nodulekit.cli import build_parser, main
    from nodulekit.data.synth.hila import HILA
    from nodulekit.errors import InputError
    from nodulekit.seeds import WORD_FIELDS

    # the CLI and the recipes spell the choices out so as not to import the generator: the same ones
    assert WORD_FIELDS["synth_hila"] == HILA
    assert build_parser().parse_args(["synth", "--out", str(tmp_path), "--scans", "1"]).hila == HILA[0]
    for h in HILA:
        assert build_parser().parse_args(["synth", "--out", str(tmp_path), "--scans", "1", "--hila", h]).hila == h

    with pytest.raises(InputError, match="hila"):
        generate_scan(0, 0, hila="fancy", **SMALL)
    with pytest.raises(InputError, match="hila"):
        generate_dataset(tmp_path / "x", 1, 0, hila="fancy", progress=False, **SMALL)
    assert main(["synth", "--out", str(tmp_path / "d"), "--scans", "1", "--size", "128", "--max-slices", "16",
                 "--hila", "lobar", "--no-progress"]) == 0
    assert json.loads((tmp_path / "d" / "synth.json").read_text())["parameters"]["hila"] == "lobar"
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "e"), "--scans", "1", "--hila", "fancy"])
    assert "invalid choice" in capsys.readouterr().err


def test_thick_slices_average_their_sub_slices_and_keep_majority_labels():
    from nodulekit.data.synth.scan import SUB_SLICE_MM, slice_samples, thick_slices

    assert slice_samples(0.625) == slice_samples(SUB_SLICE_MM) == 1
    assert slice_samples(1.25) == 2 and slice_samples(2.5) == 3 and slice_samples(5.0) == 6
    hu = np.arange(6 * 2 * 2, dtype=np.float32).reshape(6, 2, 2)
    labels = np.zeros((6, 2, 2), dtype=np.uint16)
    labels[0:2, 0, 0] = 1  # two of three sub-slices: the thick slice holds it
    labels[3, 1, 1] = 2  # one of three: it does not
    thick, lab = thick_slices(hu, labels, 3)
    np.testing.assert_allclose(thick, hu.reshape(2, 3, 2, 2).mean(axis=1))
    assert thick.dtype == np.float32 and lab.dtype == np.uint16
    assert lab[0, 0, 0] == 1 and lab.sum() == 1


def test_a_thick_slice_scan_blurs_along_z_and_keeps_its_nodules(monkeypatch):
    """A 2.5 mm scan is drawn on three sub-slices per slice: an edge that a slice cuts obliquely is
    spread over partial-volume voxels instead of jumping from lung to tissue between slices, as on
    a real thick slice; and every nodule keeps a label at its centre (as
    test_annotations_fall_inside_their_labels checks on the thin draw)."""
    import nodulekit.data.synth.scan as scan

    # scan 4 of seed 1 has 2.5 mm slices
    s = generate_scan(1, 4, size=256, max_slices=40)
    assert s.ct.spacing[2] == 2.5 and s.meta["slice_samples"] == 3
    for lab, n in enumerate(s.nodules, start=1):
        assert s.labels[tuple(np.rint(s.ct.world_to_voxel(n.center_xyz)).astype(int))] == lab

    def steps(hu):  # shares of jumps of more than 500 HU between neighbours along z and along x
        hu = hu.astype(np.float32)
        return (np.abs(np.diff(hu, axis=0)) > 500).mean(), (np.abs(np.diff(hu, axis=2)) > 500).mean()

    monkeypatch.setattr(scan, "blur_and_noise", lambda hu, acq, rng: hu)  # edges without noise
    z_profile, x_profile = steps(generate_scan(1, 4, size=256, max_slices=40).ct.hu)
    monkeypatch.setattr(scan, "SUB_SLICE_MM", 10.0)  # one sample per slice: the slice's centre plane
    z_point, x_point = steps(generate_scan(1, 4, size=256, max_slices=40).ct.hu)
    assert z_profile < 0.7 * z_point and x_profile > 0.7 * x_point


def test_thick_share_draws_3mm_scans_from_a_stream_of_its_own(tmp_path, capsys, monkeypatch):
    """``thick_share`` reconstructs that share of a draw's scans at 3 mm, as routine clinical CT
    is, and leaves every other scan byte for byte as the draw without it; the share is checked and
    recorded, and a cached draw with another share is not reused."""
    from nodulekit.cli import main
    from nodulekit.data.synth.scan import THICK_SLICE_MM, is_thick
    from nodulekit.demo import DemoConfig
    from nodulekit.errors import InputError
    from nodulekit.release import ReleaseConfig

    shares = [np.mean([is_thick(3, i, share) for i in range(2000)]) for share in (0.0, 0.25, 1.0)]
    assert shares[0] == 0.0 and abs(shares[1] - 0.25) < 0.03 and shares[2] == 1.0
    tiny = dict(size=64, max_slices=8)
    thick = next(i for i in range(50) if is_thick(0, i, 0.5))
    thin = next(i for i in range(50) if not is_thick(0, i, 0.5))
    plain, drawn = generate_scan(0, thick, **tiny), generate_scan(0, thick, thick_share=0.5, **tiny)
    assert drawn.ct.spacing[2] == THICK_SLICE_MM != plain.ct.spacing[2]
    assert drawn.ct.spacing[:2] == plain.ct.spacing[:2] and drawn.ct.seriesuid == plain.ct.seriesuid
    assert drawn.meta["spacing_xyz"][2] == THICK_SLICE_MM
    np.testing.assert_array_equal(generate_scan(0, thin, thick_share=0.5, **tiny).ct.hu,
                                  generate_scan(0, thin, **tiny).ct.hu)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="thick_share"):
            generate_scan(0, 0, thick_share=bad, **tiny)
        with pytest.raises(InputError, match="thick_share"):
            generate_dataset(tmp_path / "x", 1, 0, thick_share=bad, progress=False, **tiny)
    assert not (tmp_path / "x" / "synth.json").exists()

    assert main(["synth", "--out", str(tmp_path / "d"), "--scans", "2", "--size", "64", "--max-slices", "8",
                 "--thick-share", "1", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "d" / "synth.json").read_text())
    assert doc["parameters"]["thick_share"] == 1.0
    assert [s["spacing_xyz"][2] for s in doc["scans"]] == [THICK_SLICE_MM] * 2
    for cmd in (["synth", "--out", str(tmp_path / "e"), "--scans", "1"], ["weights", "--no-install"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--thick-share", "1.5"])
        assert "share in [0, 1]" in capsys.readouterr().err

    # the demo's and the release's data stage pass the share on, and redraw a cached draw of another share
    import nodulekit.data.synth as synth
    import nodulekit.demo as D

    assert ReleaseConfig(thick_share=0.3).demo().synth_thick_share == 0.3
    calls, real = [], synth.generate_dataset
    monkeypatch.setattr(synth, "generate_dataset", lambda *a, **k: calls.append(k["thick_share"]) or real(*a, **k))
    D._synth(DemoConfig(scans=2, size=64, max_slices=8, seed=0, synth_thick_share=1.0), tmp_path / "d")
    assert calls == []  # the CLI's draw above: the same arguments, reused
    D._synth(DemoConfig(scans=2, size=64, max_slices=8, seed=0), tmp_path / "d")
    assert calls == [0.0]
