"""Report: report.json schema, rendering in both languages, optional sections, re-render CLI."""

from __future__ import annotations

import json

import pytest

from nodulekit.errors import InputError
from nodulekit.report.plots import pareto_front
from nodulekit.report.render import load_report, render_markdown, render_report, write_report_json

ZH_HEADER = ("| 模型版本 | Weight Memory (KiB) | Reduction Ratio | Size (KiB) | Latency (us) | Reduction Ratio "
             "| Recall (%) | Recall Drop |")


def _row(name, wm, lat, recall, **extra):
    return {"name": name, "params": 1000, "weight_memory_kib": wm, "size_kib": wm * 1.5, "latency_us": lat,
            "recall": recall, "precision": 0.5, "dice": 0.6, "artifact": f"{name}/model.onnx", **extra}


def _report():
    """A report as the measurement writes it: ratios already in the rows (:func:`add_ratios`)."""
    from nodulekit.deploy.rows import add_ratios

    hist = {"unet.down_path.0.block.0": {"counts": [1, 3, 1], "edges": [-1.0, -0.3, 0.3, 1.0]}}
    report = {
        "baseline": "baseline",
        "variants": [
            _row("baseline", 460.0, 120_000.0, 0.80, weight_hist=hist),
            _row("pruned", 118.0, 60_000.0, 0.79, prune_ratio="0.5", weight_hist=hist,
                 recall_at_baseline_precision=None, threshold_at_baseline_precision=None,  # NaN in JSON
                 widths_before={"unet.down_path.0.block.0": 16, "unet.last": 1},
                 widths_after={"unet.down_path.0.block.0": 8, "unet.last": 1}),
            _row("pruned_qat", 40.0, 70_000.0, 0.795, recall_at_baseline_precision=0.612,
                 threshold_at_baseline_precision=0.745),
            {"name": "qat", "error": "RuntimeError: boom"},
        ],
        "machine": {"cpu": "test cpu", "threads": 2, "onnxruntime": "1.32.0"},
        "dataset": {"data_dir": "synth", "val_slices": 10},
        "settings": {"prune_ratio": "0.5", "finetune_epochs": 1, "qat_val_slices": 16, "calib_method": "percentile", "calib_slices": 64,
                     "qat_epochs": 5, "fn_weight_qat": 2.0, "dice_area_cap": 256.0},
        "timings_s": {"prune": 1.0, "qat": 50.0},
        "npu": [{"name": "baseline_fp16", "weight_memory_kib": 236.0, "internal_memory_kib": 28672,
                 "size_kib": 500.0, "recall": 0.8, "cpu_fallback_layers": 0, "latency_us": None},
                {"name": "pruned_int8", "weight_memory_kib": 37.3, "internal_memory_kib": 14000,
                 "size_kib": 120.0, "recall": 0.79, "cpu_fallback_layers": 0, "latency_us": None}],
        "classifier": [{"name": "cls3d", "params": 200000, "weight_memory_kib": 800.0, "size_kib": 810.0,
                        "latency_us": 5000.0, "auc": 0.95, "max_abs_diff_vs_3d": 0.0}],
        "detection": {"cpm": 0.71, "cpm_ci": [0.65, 0.77], "sensitivities": [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9],
                      "fps_per_scan": [0.125, 0.25, 0.5, 1, 2, 4, 8],
                      "operating_points": [{"threshold": 0.5, "sensitivity": 0.8, "fps_per_scan": 2.0}]},
    }
    add_ratios(report["variants"], "baseline")
    add_ratios(report["npu"], "baseline_fp16")
    return report


def test_schema_is_checked(tmp_path):
    write_report_json(_report(), tmp_path / "report.json")
    assert load_report(tmp_path)["baseline"] == "baseline"
    bad = _report()
    del bad["machine"]
    with pytest.raises(InputError, match="machine"):
        write_report_json(bad, tmp_path / "bad.json")
    bad = _report()
    bad["variants"][0]["recall"] = 80.0
    with pytest.raises(InputError, match="fraction"):
        write_report_json(bad, tmp_path / "bad.json")
    bad = _report()
    del bad["variants"][1]["latency_us"]
    with pytest.raises(InputError, match="latency_us"):
        write_report_json(bad, tmp_path / "bad.json")
    # a variant's end-to-end FROC: every key, CPM and its CI as fractions, found <= nodules
    froc = {"cpm": 0.6, "cpm_ci": [0.45, 0.74], "cpm_change": 0.0, "n_scans": 10, "n_nodules": 38,
            "nodules_found": 30, "fps_per_scan": 18.7, "candidates_per_scan": 1454.0, "seconds_per_scan": 20.1,
            "threshold": 0.5, "runtime": "onnx", "cls_runtime": "openvino"}
    good = _report()
    good["variants"][0]["froc"] = {"independent": froc}
    write_report_json(good, tmp_path / "good.json")
    for change, message in (({"cpm": 60.0}, "not a fraction"), ({"cpm_ci": [0.7, 0.5]}, "interval"),
                            ({"nodules_found": 39}, "39 nodules found of 38"), ({"n_scans": 0}, "n_scans"),
                            ({"runtime": None, "seconds_per_scan": None}, None)):
        bad = _report()
        entry = {**froc, **change}
        bad["variants"][0]["froc"] = {"independent": entry}
        if message is None:  # unknown figures may be null
            write_report_json(bad, tmp_path / "bad.json")
            continue
        with pytest.raises(InputError, match=message):
            write_report_json(bad, tmp_path / "bad.json")
    bad = _report()
    bad["variants"][0]["froc"] = {"independent": {k: v for k, v in froc.items() if k != "nodules_found"}}
    with pytest.raises(InputError, match="nodules_found"):
        write_report_json(bad, tmp_path / "bad.json")


def test_markdown_in_both_languages():
    report = _report()
    zh = render_markdown(report, "zh", {})
    en = render_markdown(report, "en", {})
    assert ZH_HEADER in zh
    assert "11.50x" in zh and "-0.5" in zh  # 460 / 40 KiB; 79.5 % vs 80 %
    for text in (en, zh):
        assert "236.81" in text and "40.56" in text and "-7.2" in text  # the reference study's figures
        assert "boom" in text  # failed variant listed
        assert "37.30" in text and "6.33x" in text  # NPU section, ratio vs the fp16 row
        assert "0.9500" in text and "0.710" in text  # classifier AUC and detection CPM
    assert "n/a (needs board)" in en and "需开发板" in zh
    assert "Recall at the baseline's precision" in en and "与基线精确率相同时的召回率" in zh
    assert "| 0.745 | 61.2 |" in en and "| 0.745 | 61.2 |" in zh
    assert "RK3588S NPU" in en and "LUNA16" in en
    # the settings paragraph, not the key-value fallback
    assert "`256.0 / max(nodule pixels, 256.0)`" in en and "`256.0 / max(结节像素数, 256.0)`" in zh
    report = _report()
    report["settings"]["dice_area_cap"] = None
    assert "`∞ / max(nodule pixels, ∞)`" in render_markdown(report, "en", {})


def test_report_cli_rerenders_from_json_alone(tmp_path):
    from nodulekit.cli import main

    write_report_json(_report(), tmp_path / "report.json")
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "REPORT.md").read_text()
    zh = (tmp_path / "REPORT.zh.md").read_text()
    for png in ("compression_bars.png", "recall_vs_latency.png", "pruning_widths.png", "weight_histograms.png"):
        assert (tmp_path / png).stat().st_size > 0
        assert f"]({png})" in md and f"]({png})" in zh
    assert json.loads((tmp_path / "report.json").read_text())["variants"][3]["error"]
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_pareto_front():
    # (latency, recall): b is dominated by a (slower and worse)
    pts = [(1.0, 0.7), (2.0, 0.6), (3.0, 0.8), (0.5, 0.5)]
    assert pareto_front(pts) == [3, 0, 2]


def test_render_report_returns_paths(tmp_path):
    write_report_json(_report(), tmp_path / "report.json")
    out = render_report(tmp_path)
    assert out["en"].is_file() and out["zh"].is_file()
