"""LUNA16 FROC on hand-made cases with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nodulekit.errors import InputError
from nodulekit.evaluate.froc import FP_RATES, evaluate_froc, match_scan

ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
DET_HEADER = "seriesuid,coordX,coordY,coordZ,probability\n"
FAR = (500.0, 500.0, 500.0)


def _write(path, header, rows):
    path.write_text(header + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


def _evaluate(tmp_path, dets, anns, excluded=None, uids=None, **kw):
    d = _write(tmp_path / "det.csv", DET_HEADER, dets)
    a = _write(tmp_path / "ann.csv", ANN_HEADER, anns)
    e = _write(tmp_path / "exc.csv", ANN_HEADER, excluded) if excluded is not None else None
    s = None
    if uids is not None:
        s = tmp_path / "uids.csv"
        s.write_text("".join(u + "\n" for u in uids))
    kw.setdefault("n_bootstrap", 0)
    return evaluate_froc(d, a, e, s, **kw)


def _nod(center=(0.0, 0.0, 0.0), radius=5.0):
    return np.array([center], dtype=float), np.array([radius])


@pytest.mark.parametrize("offset, hit", [
    ((5.0, 0.0, 0.0), True),     # exactly on the radius
    ((3.0, 4.0, 0.0), True),     # on the radius, diagonally
    ((0.0, 0.0, -5.0), True),
    ((5.01, 0.0, 0.0), False),   # just outside
    ((3.0, 4.0, 0.1), False),
])
def test_hit_at_radius(offset, hit):
    r = match_scan([offset], [0.9], _nod())
    assert len(r.tp_probs) == int(hit)
    assert len(r.fp_probs) == int(not hit)


def test_duplicate_hits_count_once_with_the_highest_probability():
    r = match_scan([(1, 0, 0), (0, 1, 0), (0, 0, 1)], [0.6, 0.9, 0.3], _nod())
    assert r.tp_probs.tolist() == [0.9]
    assert len(r.fp_probs) == 0 and r.n_ignored_duplicates == 2


def test_hit_on_excluded_finding_is_ignored(tmp_path):
    res = _evaluate(tmp_path, dets=[("a", 0, 0, 0, 0.9), ("a", 100, 0, 0, 0.8), ("a", 300, 0, 0, 0.7)],
                    anns=[("a", 0, 0, 0, 10.0)],
                    excluded=[("a", 100, 0, 0, 6.0), ("a", 303, 0, 0, -1)],  # -1: unknown size, 10 mm
                    uids=["a"])
    assert res["n_ignored_excluded"] == 2
    assert res["n_false_positives"] == 0 and res["n_true_positives"] == 1
    assert res["sensitivities"] == [1.0] * 7


def test_mark_on_both_nodule_and_excluded_is_a_true_positive():
    r = match_scan([(0, 0, 0)], [0.9], _nod(), excluded=_nod())
    assert len(r.tp_probs) == 1 and r.n_ignored_excluded == 0


def test_scans_without_marks_and_without_nodules(tmp_path):
    # scan a: one nodule, found; scan b: one nodule, no marks at all; scan c: no nodule, 2 marks (FPs)
    res = _evaluate(tmp_path,
                    dets=[("a", 0, 0, 0, 0.9), ("c", 0, 0, 0, 0.8), ("c", 50, 0, 0, 0.7)],
                    anns=[("a", 0, 0, 0, 10.0), ("b", 0, 0, 0, 10.0)], uids=["a", "b", "c", "d"])
    assert res["n_scans"] == 4 and res["n_nodules"] == 2 and res["n_detected"] == 1
    assert res["n_false_positives"] == 2
    # curve: (0, .5) at p=.9, then 2 FPs over 4 scans -> (0.5, .5); sensitivity never exceeds 1/2
    assert res["sensitivities"] == [0.5] * 7
    all_pts = res["operating_points"]["all_candidates"]
    assert all_pts["sensitivity"] == 0.5 and all_pts["fps_per_scan"] == 0.5


def test_no_marks_at_all(tmp_path):
    res = _evaluate(tmp_path, dets=[], anns=[("a", 0, 0, 0, 10.0)], uids=["a", "b"])
    assert res["sensitivities"] == [0.0] * 7 and res["cpm"] == 0.0


def test_marks_on_a_scan_outside_the_list_are_an_error(tmp_path):
    with pytest.raises(InputError, match="seriesuid zzz is not in .*uids.csv"):
        _evaluate(tmp_path, dets=[("a", 0, 0, 0, 0.9), ("zzz", 0, 0, 0, 0.9)],
                  anns=[("a", 0, 0, 0, 10.0), ("other", 0, 0, 0, 10.0)], uids=["a"])
    # annotations of scans outside the list are fine: the list may be a subset (a validation split)
    res = _evaluate(tmp_path, dets=[("a", 0, 0, 0, 0.9)], anns=[("a", 0, 0, 0, 10.0), ("other", 0, 0, 0, 10.0)],
                    uids=["a"])
    assert res["n_nodules"] == 1 and res["n_false_positives"] == 0


@pytest.mark.parametrize("kw", [dict(threshold=float("nan")), dict(threshold=2.0), dict(n_bootstrap=-1),
                                dict(max_marks=0), dict(max_sensitivity_loss=-1.0),
                                dict(max_sensitivity_loss=float("nan"))])
def test_options_out_of_range_are_refused(tmp_path, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        _evaluate(tmp_path, dets=[("a", 0, 0, 0, 0.9)], anns=[("a", 0, 0, 0, 10.0)], **kw)


def test_froc_json_is_strict_json_without_nodules(tmp_path):
    out = tmp_path / "out"
    _evaluate(tmp_path, dets=[("a", 0, 0, 0, 0.9)], anns=[], uids=["a"], out_dir=out, n_bootstrap=5)
    text = (out / "froc.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in froc.json"))
    assert doc["cpm"] is None and doc["sensitivities"] == [None] * 7


def test_max_marks_cap_keeps_the_most_probable():
    centers = [(100.0 + 10 * i, 0, 0) for i in range(100)] + [(0.0, 0.0, 0.0)]
    probs = list(np.linspace(0.5, 0.99, 100)) + [0.1]  # the only hit is the least probable mark
    capped = match_scan(centers, probs, _nod(), max_marks=100)
    assert capped.n_marks == 100 and len(capped.tp_probs) == 0 and len(capped.fp_probs) == 100
    uncapped = match_scan(centers, probs, _nod(), max_marks=None)
    assert uncapped.n_marks == 101 and len(uncapped.tp_probs) == 1


def test_interpolation_at_known_rates(tmp_path):
    # one scan, two nodules A (0,0,0) and B (0,100,0); FP marks far away.
    fp = lambda k, p: ("s", 300 + 20 * k, 0, 0, p)  # noqa: E731
    dets = [fp(0, 0.9),                                   # -> (1 FP, sens 0)
            ("s", 0, 0, 0, 0.8), fp(1, 0.8), fp(2, 0.8), fp(3, 0.8),   # tie: -> (4, 0.5)
            ("s", 0, 100, 0, 0.7)] + [fp(4 + k, 0.7) for k in range(4)]  # -> (8, 1.0)
    res = _evaluate(tmp_path, dets, anns=[("s", 0, 0, 0, 10), ("s", 0, 100, 0, 10)], uids=["s"])
    # sensitivity at 2 FP/scan lies on the segment (1, 0) -> (4, 0.5): 1/6
    expected = [0.0, 0.0, 0.0, 0.0, 1 / 6, 0.5, 1.0]
    np.testing.assert_allclose(res["sensitivities"], expected, atol=1e-6)
    np.testing.assert_allclose(res["cpm"], np.mean(expected), atol=1e-6)
    assert res["fps_per_scan"] == list(FP_RATES)
    thr = res["operating_points"]["at_threshold"]
    assert thr["sensitivity"] == 1.0 and thr["fps_per_scan"] == 8.0


def test_fewest_false_positives_within_a_sensitivity_loss(tmp_path):
    # 20 nodules in one scan, found at probabilities 0.99 .. 0.80 (step 0.01); 100 FP marks at 0.005 ..
    # 0.995 (step 0.01), 40 of them above 0.6; the max_marks cap does not apply to this point
    anns = [("s", 0, 100 * k, 0, 10) for k in range(20)]
    dets = [("s", 0, 100 * k, 0, round(0.99 - 0.01 * k, 2)) for k in range(20)]
    dets += [("s", 5000 + 20 * k, 0, 0, round(0.005 + 0.01 * k, 3)) for k in range(100)]
    res = _evaluate(tmp_path, dets, anns, uids=["s"])
    every, best = res["operating_points"]["all_candidates"], res["operating_points"]["within_loss"]
    assert every["sensitivity"] == 1.0 and every["fps_per_scan"] == 100
    # 5 points of 20 nodules: one may be lost; the 19th-highest nodule sits at 0.81, above it 19 FPs
    assert best["true_positives"] == 19 and best["threshold"] == pytest.approx(0.81)
    assert best["false_positives"] == 19 and best["fp_reduction"] == pytest.approx(100 / 19)
    none_lost = _evaluate(tmp_path, dets, anns, uids=["s"], max_sensitivity_loss=0.0)["operating_points"]["within_loss"]
    assert none_lost["true_positives"] == 20 and none_lost["false_positives"] == 20
    # segmentation that misses half: the loss counts from what every mark finds (10 of 20)
    half = _evaluate(tmp_path, dets[10:], anns, uids=["s"], max_sensitivity_loss=0.1)["operating_points"]
    assert half["all_candidates"]["sensitivity"] == 0.5
    assert half["within_loss"]["true_positives"] == 8 and half["within_loss"]["threshold"] == pytest.approx(0.82)
    assert _evaluate(tmp_path, dets, [], uids=["s"])["operating_points"]["within_loss"] is None


def test_vertical_segment_takes_the_highest_sensitivity(tmp_path):
    # 8 scans: at exactly 1 FP per scan (8 FPs) two more nodules are found at the same probability
    dets = [("s0", 300 + 10 * k, 0, 0, 0.9) for k in range(8)]
    dets += [("s0", 0, 0, 0, 0.5), ("s1", 0, 0, 0, 0.5)]
    anns = [("s0", 0, 0, 0, 10), ("s1", 0, 0, 0, 10)]
    res = _evaluate(tmp_path, dets, anns, uids=[f"s{i}" for i in range(8)])
    assert res["sensitivities"][3] == 1.0  # at 1 FP/scan
    assert res["sensitivities"][2] == 0.0  # at 1/2


def test_bootstrap_ci_and_outputs(tmp_path):
    rng = np.random.default_rng(1)
    dets, anns, uids = [], [], []
    for i in range(20):
        uid = f"scan{i}"
        uids.append(uid)
        anns.append((uid, 0, 0, 0, 8))
        if i % 3:
            dets.append((uid, 1, 0, 0, round(float(rng.uniform(0.3, 1.0)), 4)))
        dets += [(uid, 200 + 10 * k, 0, 0, round(float(rng.uniform(0, 0.9)), 4)) for k in range(5)]
    res = _evaluate(tmp_path, dets, anns, uids=uids, n_bootstrap=200, out_dir=tmp_path / "out")
    lo, hi = res["cpm_ci"]
    assert 0 <= lo <= res["cpm"] <= hi <= 1
    assert len(res["sensitivities_ci"]) == 7
    saved = json.loads((tmp_path / "out" / "froc.json").read_text())
    for key in ("sensitivities", "fps_per_scan", "cpm", "cpm_ci", "n_scans", "n_nodules", "n_detections"):
        assert key in saved
    assert saved["n_scans"] == 20 and saved["n_detections"] == len(dets)
    assert (tmp_path / "out" / "froc.png").stat().st_size > 1000


@pytest.mark.parametrize("row, problem", [
    ("a,1,2,3,abc", "line 3"),
    ("a,1,2,3", "line 3"),
    ("a,1,nan,3,0.5", "line 3"),
])
def test_malformed_detections_name_file_and_line(tmp_path, row, problem):
    d = tmp_path / "bad_dets.csv"
    d.write_text(DET_HEADER + "a,1,2,3,0.5\n" + row + "\n")
    a = _write(tmp_path / "ann.csv", ANN_HEADER, [("a", 0, 0, 0, 10)])
    with pytest.raises(InputError) as err:
        evaluate_froc(d, a, n_bootstrap=0)
    assert "bad_dets.csv" in str(err.value) and problem in str(err.value)


def test_missing_probability_column(tmp_path):
    d = tmp_path / "dets.csv"
    d.write_text("seriesuid,coordX,coordY,coordZ\na,1,2,3\n")
    a = _write(tmp_path / "ann.csv", ANN_HEADER, [("a", 0, 0, 0, 10)])
    with pytest.raises(InputError, match="probability"):
        evaluate_froc(d, a, n_bootstrap=0)


def test_cli_evaluate(tmp_path):
    from nodulekit.cli import main

    d = _write(tmp_path / "det.csv", DET_HEADER, [("a", 0, 0, 0, 0.9), ("a", 90, 0, 0, 0.4)])
    a = _write(tmp_path / "ann.csv", ANN_HEADER, [("a", 0, 0, 0, 10)])
    assert main(["evaluate", "--detections", str(d), "--annotations", str(a), "--out", str(tmp_path / "o"),
                 "--bootstrap", "50"]) == 0
    assert json.loads((tmp_path / "o" / "froc.json").read_text())["n_nodules"] == 1
    assert main(["evaluate", "--detections", str(tmp_path / "nope.csv"), "--annotations", str(a),
                 "--out", str(tmp_path / "o")]) == 1
