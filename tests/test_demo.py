"""The demo's stage helpers (the whole demo runs in `make demo`, too slow for the suite)."""

import json

from nodulekit.demo import DemoConfig, _synth


def test_quick_mode_is_smaller_in_every_stage():
    full, quick = DemoConfig.for_mode(quick=False), DemoConfig.for_mode(quick=True)
    assert quick.scans < full.scans and quick.size < full.size
    assert quick.qat_epochs <= full.qat_epochs and quick.bench_runs < full.bench_runs
    assert full.qat_epochs == 5 and full.scans >= 8


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
