"""Compression search: probed widths, the budgeted choice, the uniform cut, and a small end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from nodulekit.models.unet import SegModel, UNetWidths
from nodulekit.optimize import search as S

BASE = UNetWidths.default()
FULL = S.blocks(BASE)


def test_average_precision_from_the_histograms_matches_scikit_learn():
    import numpy as np
    from sklearn.metrics import average_precision_score

    from nodulekit.evaluate.seg_metrics import average_precision

    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.1
    probs = np.clip(np.where(labels, rng.normal(0.7, 0.2, 5000), rng.normal(0.3, 0.2, 5000)), 0, 0.999)
    bins = (probs * 200).astype(int)  # what evaluate_seg bins: 200 probability bins
    hist = {"pos": np.bincount(bins[labels], minlength=200), "neg": np.bincount(bins[~labels], minlength=200)}
    assert average_precision(hist) == pytest.approx(average_precision_score(labels, bins), abs=1e-9)
    assert np.isnan(average_precision({"pos": [0, 0], "neg": [3, 1]}))


def test_blocks_and_probed_widths_are_multiples_of_8():
    assert FULL == {"down_path.0": 16, "down_path.1": 32, "down_path.2": 64, "up_path.0": 32, "up_path.1": 16}
    assert S.probe_widths(64, (0.25, 0.5, 0.75)) == [16, 32, 48]
    assert S.probe_widths(32, (0.25, 0.5, 0.75)) == [8, 16, 24]
    assert S.probe_widths(16, (0.25, 0.5, 0.75)) == [8]
    assert S.probe_widths(8, (0.5,)) == []  # nothing narrower than one multiple


@pytest.mark.parametrize("choice", [{"down_path.2": 24, "up_path.1": 8},
                                    {"down_path.0": 8, "down_path.1": 16, "down_path.2": 32, "up_path.0": 16,
                                     "up_path.1": 8}])
def test_ratio_spec_prunes_to_the_chosen_widths(choice):
    from nodulekit.optimize.prune import prune_seg

    torch.manual_seed(0)
    pruned = prune_seg(SegModel(), S.ratio_spec(FULL, choice))
    assert pruned.current_widths() == S.widths_for(BASE, choice)
    assert S.ratio_spec(FULL, {}) == "0"


def test_npu_weight_memory_estimate_counts_every_conv():
    params = sum(p.numel() for p in SegModel().parameters())
    plain = S.npu_weight_kib(BASE, align_in=1, overhead_kib=0)
    assert params / 1024 * 0.95 < plain < params / 1024  # the weights less the norms' and biases' share
    assert S.npu_weight_kib(BASE, bytes_per_weight=2, align_in=1, overhead_kib=0) == pytest.approx(2 * plain)
    narrow = S.widths_for(BASE, {"down_path.0": 8, "up_path.1": 8})
    assert S.npu_weight_kib(narrow) > S.npu_weight_kib(narrow, align_in=1)  # packing to 16 costs
    assert S.npu_weight_kib(narrow, overhead_kib=0) + S.NPU_OVERHEAD_KIB == pytest.approx(S.npu_weight_kib(narrow))


def test_choose_takes_the_least_loss_within_the_budget():
    loss = {"down_path.2": {16: 0.30, 32: 0.10, 48: 0.02}, "down_path.1": {8: 0.20, 16: 0.05, 24: 0.01},
            "up_path.0": {8: 0.50, 16: 0.40, 24: 0.01}}
    memory = S.npu_weight_kib
    full_kib = memory(BASE)
    assert S.choose(FULL, loss, memory, full_kib + 1, BASE)["predicted_loss"] == 0.0  # no cut needed
    budget = 0.6 * full_kib
    pick = S.choose(FULL, loss, memory, budget, BASE)
    assert pick["memory_kib"] <= budget
    # exhaustive: no combination of the probed widths within the budget predicts a smaller loss
    import itertools

    options = [[(FULL[b], 0.0), *loss.get(b, {}).items()] for b in FULL]
    fits = [sum(v for _, v in c) for c in itertools.product(*options)
            if memory(S.widths_for(BASE, {b: w for b, (w, _) in zip(FULL, c)})) <= budget]
    assert pick["predicted_loss"] == pytest.approx(min(fits))
    assert S.choose(FULL, loss, memory, 1.0, BASE) is None


def test_slice_macs_and_the_cpu_budget():
    base = S.slice_macs(BASE)
    assert base == 6_576_668_672  # counted by hand from the widths: 0.87 + 0.91 + 0.91 G down, 2.0 + 1.9 G up
    half = S.widths_for(BASE, {b: w // 2 for b, w in FULL.items()})
    assert 3.2 < base / S.slice_macs(half) < 4.2  # halving every width cuts the work about 4x
    loss = {"down_path.0": {8: 0.1}, "down_path.1": {16: 0.1}, "down_path.2": {32: 0.01},
            "up_path.0": {16: 0.05}, "up_path.1": {8: 0.2}}
    roomy = S.choose(FULL, loss, S.npu_weight_kib, 1e9, BASE)
    assert roomy["choice"] == FULL and roomy["macs"] == base
    fast = S.choose(FULL, loss, S.npu_weight_kib, 1e9, BASE, max_macs=base // 2)
    assert fast["macs"] <= base // 2
    # the full-resolution blocks hold most of the work: no cut of the others alone halves it
    assert fast["choice"]["down_path.0"] == 8 or fast["choice"]["up_path.1"] == 8
    assert S.uniform_at_budget(FULL, S.npu_weight_kib, 1e9, BASE, max_macs=base // 3)["macs"] <= base // 3


def test_uniform_cut_is_the_largest_that_fits():
    memory = S.npu_weight_kib
    pick = S.uniform_at_budget(FULL, memory, 30.0, BASE)
    assert pick["memory_kib"] <= 30.0
    assert all(w % 8 == 0 for w in pick["choice"].values())
    wider = {b: w + 8 if w < FULL[b] else w for b, w in pick["choice"].items()}
    assert memory(S.widths_for(BASE, wider)) > 30.0 or wider == pick["choice"]
    assert S.uniform_at_budget(FULL, memory, 0.5, BASE) is None


def test_search_cli_runs_sensitivity_and_builds_both_cuts(synth_data, tmp_path, capsys):
    """`nodulekit optimize --search` on a small model: one probe per block, the winner and the
    uniform cut within the budget, each measured as a study whose deployed files fit the estimate."""
    from nodulekit.cli import main
    from nodulekit.models.checkpoint import save_seg_checkpoint

    torch.manual_seed(0)
    save_seg_checkpoint(tmp_path / "seg.pt", SegModel())
    budget = 0.5 * S.npu_weight_kib(BASE)
    rc = main(["optimize", "--search", "--seg", str(tmp_path / "seg.pt"), "--data", str(synth_data),
               "--out", str(tmp_path / "s"), "--budget-kib", f"{budget}", "--fractions", "0.5",
               "--probe-steps", "2", "--probe-val-slices", "4", "--variants", "pruned", "pruned_qat",
               "--finetune-epochs", "1", "--qat-epochs", "1", "--samples-per-epoch", "16", "--batch-size", "8",
               "--calib-slices", "4", "--bench-runs", "2", "--bench-warmup", "1", "--bench-size", "64",
               "--no-torchscript", "--no-openvino", "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "s" / "search.json").read_text())
    sens = doc["sensitivity"]["blocks"]
    assert {b: sorted(map(int, v)) for b, v in sens.items()} == {b: S.probe_widths(w, (0.5,)) for b, w in FULL.items()}
    assert doc["picks"]["reference"]["prune_ratio"] == "0.5,down_path.2=0.625"  # the study's own cut, scored
    assert doc["picks"]["reference"]["choice"]["down_path.2"] == 24
    for name in ("searched", "uniform"):
        pick = doc["picks"][name]
        assert pick["memory_kib"] <= budget and 0.0 <= pick["proxy"]["ap"] <= 1.0
        rows = {r["name"]: r for r in doc["studies"][name]["rows"]}
        assert set(rows) == {"baseline", "pruned", "pruned_qat"} and not any("error" in r for r in rows.values())
        assert S.widths_for(BASE, pick["choice"]).to_dict() == rows["pruned"]["widths"]
        assert (tmp_path / "s" / name / "REPORT.md").is_file()
    out = capsys.readouterr().out
    assert "searched" in out and "uniform" in out and "search.json" in out
