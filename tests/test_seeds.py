"""``nodulekit seeds``: recipes over several training seeds, scored on an independent draw.

The training stages are replaced by stubs that hand back the shipped weights (training is what the
demo's tests cover); the scoring runs for real on the small synthetic draw."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from nodulekit import demo
from nodulekit.demo import StageResult
from nodulekit.models.shipped import shipped_model
from nodulekit.seeds import SeedsConfig, judge_recipes, parse_recipe


def _stub_training(monkeypatch, data: Path) -> dict:
    calls = {"data": 0, "seg": [], "mine": 0, "cls": [], "segmented": 0, "threads": set()}

    def data_stage(cfg, out):
        calls["data"] += 1
        (out / "split.json").write_text("{}")
        return StageResult({"scans": 4}, {"data": data, "split": out / "split.json"})

    def seg_stage(cfg, out, files, threads=None):
        calls["seg"].append(cfg.seed)
        calls["threads"].add(("seg", threads))
        return StageResult({"best": {"dice": 0.5}}, {"checkpoint": Path(shipped_model("seg"))})

    def mine_stage(cfg, out, files, ckpt, threads=2):
        calls["mine"] += 1
        calls["threads"].add(("mine", threads))
        (out / "c.csv").write_text("seriesuid\n")
        return StageResult({}, {"candidates": out / "c.csv"})

    def cls_stage(cfg, out, files, candidates, threads=None):
        calls["cls"].append((cfg.seed, cfg.cls_epochs))
        calls["threads"].add(("cls", threads))
        return StageResult({"best": {"auc": 0.9}}, {"checkpoint": Path(shipped_model("cls"))})

    from nodulekit.detect import pipeline

    real_detect = pipeline.detect_scan

    def counting_detect(*args, **kwargs):
        calls["segmented"] += 1
        return real_detect(*args, **kwargs)

    monkeypatch.setattr(demo, "data_stage", data_stage)
    monkeypatch.setattr(demo, "train_seg_stage", seg_stage)
    monkeypatch.setattr(demo, "mine_stage", mine_stage)
    monkeypatch.setattr(demo, "train_cls_stage", cls_stage)
    monkeypatch.setattr(pipeline, "detect_scan", counting_detect)
    return calls


def test_recipes_share_their_stages_and_report_the_mean_and_spread_of_their_seeds(synth_data, tmp_path,
                                                                                   monkeypatch):
    calls = _stub_training(monkeypatch, synth_data)
    cfg = SeedsConfig(independent=str(synth_data), out=str(tmp_path / "seeds"), seeds=(0, 1),
                      recipes={"demo": {}, "short": {"cls_epochs": 3}}, threads=1)
    summary = judge_recipes(cfg, progress=False)
    # every stage keeps to the judge's threads, so that judges side by side do not oversubscribe
    assert calls["threads"] == {("seg", 1), ("mine", 1), ("cls", 1)}

    # one draw; a segmentation and its mining per seed, shared by the two recipes; a classifier per pair
    assert calls["data"] == 1 and sorted(calls["seg"]) == [0, 1] and calls["mine"] == 2
    assert sorted(calls["cls"]) == [(0, 3), (0, 8), (1, 3), (1, 8)]
    n_scans = len((synth_data / "seriesuids.csv").read_text().split())
    assert calls["segmented"] == 2 * n_scans  # each scan segmented once per segmentation model

    doc = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert doc == json.loads(json.dumps(summary))
    assert [r["name"] for r in doc["recipes"]] == ["demo", "short"]
    assert doc["independent"]["n_scans"] == n_scans
    for r in doc["recipes"]:
        cpms = [s["cpm"] for s in r["seeds"]]
        assert [s["seed"] for s in r["seeds"]] == [0, 1] and all(0 <= c <= 1 for c in cpms)
        assert all(set(s["at_threshold"]) == {"threshold", "sensitivity", "fps_per_scan", "true_positives"}
                   for s in r["seeds"])
        assert r["cpm_mean"] == pytest.approx(sum(cpms) / 2)
        assert r["cpm_min"] == min(cpms) and r["cpm_max"] == max(cpms)
        # the stubs hand every seed the same models, so the seeds score alike
        assert r["cpm_sd"] == pytest.approx(0, abs=1e-12)
    assert doc["recipes"][1]["overrides"] == {"cls_epochs": 3}
    assert doc["recipes"][1]["settings"]["cls_epochs"] == 3 and doc["recipes"][0]["settings"]["cls_epochs"] == 8
    md = (tmp_path / "seeds" / "seeds.md").read_text()
    assert "| short | cls_epochs=3 |" in md and f"{doc['recipes'][0]['cpm_mean']:.3f}" in md

    # a rerun trains and segments nothing: every stage and score is reused
    before = {k: (list(v) if isinstance(v, list) else v) for k, v in calls.items()}
    again = judge_recipes(cfg, progress=False)
    assert calls == before
    assert [r["cpm_mean"] for r in again["recipes"]] == [r["cpm_mean"] for r in summary["recipes"]]

    # a finished stage whose file is gone runs again; the stages after it keep their results
    next(iter((tmp_path / "seeds" / "mine").glob("*/c.csv"))).unlink()
    judge_recipes(cfg, progress=False)
    assert calls["mine"] == before["mine"] + 1 and calls["cls"] == before["cls"]
    assert calls["segmented"] == before["segmented"]  # the models are the same: their scores stand
    # a model trained anew is scored anew
    next(iter((tmp_path / "seeds" / "seg").glob("*/done.json"))).unlink()
    judge_recipes(cfg, progress=False)
    assert len(calls["seg"]) == len(before["seg"]) + 1 and calls["segmented"] == before["segmented"] + n_scans
    assert len(calls["cls"]) == len(before["cls"])  # both recipes' classifiers rescored behind it, not retrained

    # the same folder scoring another draw scores anew: a score stands for the draw it was made on
    other = tmp_path / "other"  # one scan of the same draw
    uid = (synth_data / "seriesuids.csv").read_text().split()[0]
    (other / "subset0").mkdir(parents=True)
    for p in (synth_data / "subset0").glob(f"{uid}.*"):
        (other / "subset0" / p.name).symlink_to(p)
    (other / "seriesuids.csv").write_text(uid + "\n")
    (other / "annotations.csv").symlink_to(synth_data / "annotations.csv")
    segmented = calls["segmented"]
    judge_recipes(replace(cfg, independent=str(other)), progress=False)
    assert calls["segmented"] == segmented + 2  # each segmentation model on the one scan


def test_a_recipe_is_a_name_and_training_overrides():
    assert parse_recipe("demo") == ("demo", {})
    assert parse_recipe("short:cls_epochs=6,seg_steps=150") == ("short", {"cls_epochs": 6, "seg_steps": 150})
    from nodulekit.errors import InputError

    for bad in ("", "a:scans=3", "a:cls_epochs", "a:cls_epochs=x", "a b:cls_epochs=1"):
        with pytest.raises(InputError):
            parse_recipe(bad)


def test_the_cli_refuses_a_draw_without_annotations_in_one_line(tmp_path, capsys):
    from nodulekit.cli import main

    assert main(["seeds", str(tmp_path), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "annotations.csv" in err and "missing" in err


def test_a_recipe_may_give_the_classifier_a_context_channel():
    assert parse_recipe("wide:cls_context=2.5,cls_epochs=6") == ("wide", {"cls_context": 2.5, "cls_epochs": 6})
    from nodulekit.errors import InputError

    for bad in ("a:cls_context=x", "a:cls_context=nan", "a:cls_epochs=2.5"):
        with pytest.raises(InputError):
            parse_recipe(bad)


def test_a_recipe_may_mirror_the_slices_and_average_the_classifiers_weights():
    assert parse_recipe("z:cls_flip_slices=on,cls_ema=0.99") == ("z", {"cls_flip_slices": True, "cls_ema": 0.99})
    assert parse_recipe("z:cls_flip_slices=off") == ("z", {"cls_flip_slices": False})
    settings = replace(demo.DemoConfig(), cls_flip_slices=True, cls_ema=0.99).cls_settings()
    assert (settings["flip_slices"], settings["ema"]) == (True, 0.99)
    # left out, they leave the settings (and so the cached runs' keys) as they were
    assert not {"flip_slices", "ema"} & set(demo.DemoConfig().cls_settings())
    for bad in ("a:cls_flip_slices=1", "a:cls_ema=x", "a:cls_ema=1"):
        with pytest.raises(Exception, match="--recipe"):
            parse_recipe(bad)


def test_a_recipe_may_set_the_segmentations_false_negative_weight():
    from nodulekit.demo import DemoConfig
    from nodulekit.errors import InputError

    name, overrides = parse_recipe("fn2:seg_fn_weight=2")
    assert (name, overrides) == ("fn2", {"seg_fn_weight": 2.0})
    assert DemoConfig(**overrides).seg_settings()["fn_weight"] == 2.0
    assert "fn_weight" not in DemoConfig().seg_settings()  # unset: SegTrainConfig's default
    for bad in ("a:seg_fn_weight=-1", "a:seg_fn_weight=inf", "a:seg_fn_weight=x"):
        with pytest.raises(InputError):
            parse_recipe(bad)


def test_a_recipe_may_train_on_the_lobar_hila_draw(synth_data, tmp_path, monkeypatch):
    from nodulekit import seeds
    from nodulekit.errors import InputError

    assert parse_recipe("hila:synth_hila=lobar") == ("hila", {"synth_hila": "lobar"})
    assert parse_recipe("t:synth_thick_share=0.25") == ("t", {"synth_thick_share": 0.25})
    for bad in ("a:synth_hila=1", "a:synth_hila=fancy", "a:synth_thick_share=1.5", "a:synth_thick_share=-1"):
        with pytest.raises(InputError):
            parse_recipe(bad)

    calls = _stub_training(monkeypatch, synth_data)
    draws = []

    def data_stage(cfg, out):  # one folder per draw, as the real stage writes
        draws.append(cfg.synth_hila if not cfg.synth_thick_share else f"{cfg.synth_hila} {cfg.synth_thick_share}")
        (out / "split.json").write_text("{}")
        return StageResult({"scans": 4}, {"data": out, "split": out / "split.json"})

    monkeypatch.setattr(demo, "data_stage", data_stage)
    monkeypatch.setattr(seeds, "_score", lambda runs, *a, **k: {r.cls_key: {"cpm": 0.5, "n_scans": 1, "n_nodules": 1}
                                                               for r in runs})
    cfg = SeedsConfig(independent=str(synth_data), out=str(tmp_path / "seeds"), seeds=(0,),
                      recipes={"demo": {}, "hila": {"synth_hila": "lobar"},
                               "hila_short": {"synth_hila": "lobar", "cls_epochs": 3},
                               "thick": {"synth_thick_share": 0.25}})
    summary = judge_recipes(cfg, progress=False)
    # a draw per anatomy and share of 3 mm scans; a segmentation per draw, shared by the recipes that train on it
    assert sorted(draws) == ["lobar", "simple", "simple 0.25"] and len(calls["seg"]) == 3 and calls["mine"] == 3
    assert len(calls["cls"]) == 4
    assert [r["settings"]["synth_hila"] for r in summary["recipes"]] == ["simple", "lobar", "lobar", "simple"]
    assert [r["settings"]["synth_thick_share"] for r in summary["recipes"]] == [0.0, 0.0, 0.0, 0.25]
