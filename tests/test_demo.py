"""The demo's stage helpers (the whole demo runs in `make demo`, too slow for the suite)."""

import json

from nodulekit.demo import DemoConfig, _synth


def test_quick_mode_is_smaller_in_every_stage():
    full, quick = DemoConfig.for_mode(quick=False), DemoConfig.for_mode(quick=True)
    assert quick.scans < full.scans and quick.size < full.size
    assert quick.qat_epochs <= full.qat_epochs and quick.bench_runs < full.bench_runs
    assert full.qat_epochs == 5 and full.scans >= 8
    assert quick.cls_epochs < full.cls_epochs and quick.mine_slices < full.mine_slices


def test_synthetic_data_is_reused_only_with_the_same_parameters(tmp_path, monkeypatch):
    calls = []

    def fake_generate(out, n_scans, seed, **kw):
        calls.append(n_scans)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"scans": n_scans}
        params = {"seed": seed, "n_scans": n_scans, "size": kw["size"], "max_slices": kw["max_slices"]}
        (out / "synth.json").write_text(json.dumps({"parameters": params, "summary": summary}))
        return summary

    monkeypatch.setattr("nodulekit.data.synth.generate_dataset", fake_generate)
    cfg = DemoConfig.for_mode(quick=True)
    data = tmp_path / "data"
    assert _synth(cfg, data) == {"scans": cfg.scans}
    assert _synth(cfg, data) == {"scans": cfg.scans} and calls == [cfg.scans]
    cfg.scans += 1
    _synth(cfg, data)
    assert calls == [cfg.scans - 1, cfg.scans]


def test_demo_holds_out_the_same_number_of_scans_whatever_its_size():
    from nodulekit.data.split import train_val_split

    for scans, held_out in ((20, 3), (12, 3), (40, 3), (4, 2)):
        cfg = DemoConfig.for_mode(quick=False, scans=scans)
        uids = [f"1.2.{i}" for i in range(scans)]
        assert len(train_val_split(uids, cfg.val_fraction)[1]) == held_out, scans
    quick = DemoConfig.for_mode(quick=True)
    assert len(train_val_split([f"u{i}" for i in range(quick.scans)], quick.val_fraction)[1]) == 2
