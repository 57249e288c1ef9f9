"""One source of defaults: the run settings' dataclasses, and the CLI options built from them."""

from __future__ import annotations

import dataclasses

import pytest

import nodulekit
from nodulekit.cli import build_parser
from nodulekit.cli._config import config_from_args, option_name
from nodulekit.optimize.study import StudyConfig
from nodulekit.train.cls import ClsTrainConfig
from nodulekit.train.config import RunConfig, TrainConfig
from nodulekit.train.seg import SegTrainConfig

# each config, the command whose options it gives, and the options that command requires
COMMANDS = {
    SegTrainConfig: (["train", "seg"], ["--data", "D"]),
    ClsTrainConfig: (["train", "cls"], ["--data", "D"]),
    StudyConfig: (["optimize"], ["--seg", "s.pt", "--data", "D", "--out", "O"]),
}
CONFIGS = list(COMMANDS)


def _subparser(argv):
    """The argparse parser of the subcommand ``argv`` (e.g. ``["train", "seg"]``)."""
    parser = build_parser()
    for name in argv:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def _parse(cls, *options):
    command, required = COMMANDS[cls]
    return build_parser().parse_args([*command, *required, *options])


def test_every_training_config_derives_from_the_base():
    for cls in CONFIGS:
        assert issubclass(cls, RunConfig), cls
    assert issubclass(SegTrainConfig, TrainConfig) and issubclass(ClsTrainConfig, TrainConfig)
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    assert {"seed", "val_fraction", "split", "batch_size", "workers", "threads", "val_every", "progress"} <= shared
    for cls in CONFIGS:
        own = set(vars(cls)["__annotations__"])
        # a subclass redeclares a shared field only to change its default
        for name in own & shared:
            assert getattr(cls, name) != getattr(RunConfig, name), (cls, name)


def test_named_defaults():
    for cls in CONFIGS:
        assert cls().val_fraction == nodulekit.VAL_FRACTION and cls().split is None
    assert StudyConfig().threads == 2 and SegTrainConfig().threads is None  # the study's fixed thread count
    assert StudyConfig().fn_weight == SegTrainConfig().fn_weight and StudyConfig().crop == SegTrainConfig().crop


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_help_and_an_option(cls):
    parser = _subparser(COMMANDS[cls][0])
    options = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(cls):
        assert option_name(f.name) in options, f.name
        action = next(a for a in parser._actions if option_name(f.name) in a.option_strings)
        assert action.help and action.dest == f.name, f.name


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_no_option_gives_the_dataclass_defaults(cls):
    args = _parse(cls)
    given = {"data": "D"} if "data" in {f.name for f in dataclasses.fields(cls)} else {}
    assert config_from_args(cls, args) == cls(**given)


def test_options_reach_the_config():
    cfg = config_from_args(SegTrainConfig, _parse(SegTrainConfig, "--epochs", "3", "--no-augment", "--per-sample-dice",
                                                  "--dice-area-cap", "0", "--split", "s.json", "--threads", "2"))
    assert (cfg.epochs, cfg.augment, cfg.batch_dice, cfg.dice_area_cap, cfg.split, cfg.threads) == \
        (3, False, False, None, "s.json", 2)
    cfg = config_from_args(ClsTrainConfig, _parse(ClsTrainConfig, "--crop-spacing", "native", "--no-norm", "--keep",
                                                  "last", "--val-fraction", "0"))
    assert (cfg.crop_spacing, cfg.norm, cfg.keep, cfg.val_fraction) == (None, False, "last", 0.0)
    cfg = config_from_args(ClsTrainConfig, _parse(ClsTrainConfig, "--crop-spacing", "1,0.7,0.7"))
    assert cfg.crop_spacing == (1.0, 0.7, 0.7)
    cfg = config_from_args(StudyConfig, _parse(StudyConfig, "--variants", "baseline", "qat", "--no-torchscript",
                                               "--rknn", "--qat-val-slices", "0", "--prune-ratio", "0.25"))
    assert (cfg.variants, cfg.torchscript, cfg.rknn, cfg.qat_val_slices, cfg.prune_ratio) == \
        (("baseline", "qat"), False, True, None, "0.25")


@pytest.mark.parametrize("cls, option, value", [
    (SegTrainConfig, "--epochs", "0"), (SegTrainConfig, "--batch-size", "-4"), (SegTrainConfig, "--workers", "-1"),
    (SegTrainConfig, "--val-fraction", "1"), (SegTrainConfig, "--negative-share", "1.5"),
    (SegTrainConfig, "--lr", "0"), (ClsTrainConfig, "--keep", "median"), (ClsTrainConfig, "--crop-spacing", "1,2"),
    (ClsTrainConfig, "--insert-share", "-0.1"), (StudyConfig, "--bench-runs", "0"),
    (StudyConfig, "--val-fraction", "-0.2"), (StudyConfig, "--calib-slices", "many"),
])
def test_out_of_range_values_are_refused(cls, option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(cls, option, value)
    assert exc.value.code == 2 and option in capsys.readouterr().err


def test_demo_settings_name_config_fields_and_keep_the_defaults_it_does_not_change():
    from nodulekit.demo import DemoConfig

    full = DemoConfig.for_mode(quick=False)
    for settings, cls in ((full.seg_settings(), SegTrainConfig), (full.cls_settings(), ClsTrainConfig),
                          (full.study_settings(), StudyConfig)):
        assert set(settings) <= {f.name for f in dataclasses.fields(cls)}, cls
        assert settings["val_fraction"] == full.val_fraction and settings["seed"] == full.seed
    # the full demo trims the configs' budgets to fit its time, never raises them
    assert full.cls_settings()["epochs"] <= ClsTrainConfig.epochs
    assert full.cls_settings()["detector_from_epoch"] <= ClsTrainConfig.detector_from_epoch
    assert full.study_settings()["qat_epochs"] <= StudyConfig.qat_epochs
    assert full.study_settings()["bench_runs"] <= StudyConfig.bench_runs
    quick = DemoConfig.for_mode(quick=True)
    assert quick.seg_settings()["epochs"] < SegTrainConfig.epochs
    assert quick.study_settings()["samples_per_epoch"] < StudyConfig.samples_per_epoch


def test_mine_threshold_reaches_mine_candidates(tmp_path, monkeypatch):
    from nodulekit.cli import main
    from nodulekit.data.split import write_split

    seen = {}

    def fake_mine(data, seg, out, **kw):
        seen.update(kw)
        return {"failed": [], "scans_ok": 1, "candidates": 0, "negatives": 0, "near_findings": 0, "seconds": 0.0,
                "csv": str(out)}

    monkeypatch.setattr("nodulekit.detect.mine.mine_candidates", fake_mine)
    monkeypatch.setattr("nodulekit.data.luna.find_series", lambda d: {f"1.2.{k}": None for k in range(4)})
    assert main(["mine", "--data", "D", "--seg", "s.pt", "--out", str(tmp_path / "m.csv"), "--no-progress"]) == 0
    assert seen["threshold"] == nodulekit.SEG_THRESHOLD and len(seen["uids"]) == 3
    split = write_split(tmp_path / "split.json", ["1.2.0", "1.2.2"], ["1.2.1"])
    assert main(["mine", "--data", "D", "--seg", "s.pt", "--out", str(tmp_path / "m.csv"), "--threshold", "0.3",
                 "--split", str(split), "--no-progress"]) == 0
    assert seen["threshold"] == 0.3 and seen["uids"] == ["1.2.0", "1.2.2"]
    with pytest.raises(SystemExit):
        main(["mine", "--data", "D", "--seg", "s.pt", "--out", "m.csv", "--threshold", "1.5"])


def test_mine_candidates_passes_its_threshold_to_the_detector(tmp_path, monkeypatch):
    import numpy as np

    from nodulekit.data.ct import write_ct
    from nodulekit.data.luna import write_annotations
    from nodulekit.deploy import runtime
    from nodulekit.detect import pipeline
    from nodulekit.detect.mine import mine_candidates
    from tests.test_detect import phantom_ct

    write_ct(phantom_ct(depth=20, uid="1.2.0"), tmp_path / "subset0" / "1.2.0.mhd")
    write_annotations(tmp_path / "annotations.csv", [])
    monkeypatch.setattr(runtime, "load_seg_runner", lambda *a, **k: None)
    seen = []

    def fake_detect_scan(ct, seg_runner, cls_runner, **kw):
        seen.append(kw["seg_threshold"])
        return {"candidates": []}

    monkeypatch.setattr(pipeline, "detect_scan", fake_detect_scan)
    mine_candidates(tmp_path, "seg.pt", tmp_path / "m.csv", threshold=0.7, progress=False)
    mine_candidates(tmp_path, "seg.pt", tmp_path / "m.csv", progress=False)
    assert seen == [0.7, nodulekit.SEG_THRESHOLD] and np.isfinite(seen).all()


@pytest.mark.parametrize("train, cls, builder", [
    ("nodulekit.train.seg.train_seg", SegTrainConfig, "nodulekit.data.seg_dataset.build_seg_datasets"),
    ("nodulekit.train.cls.train_cls", ClsTrainConfig, "nodulekit.data.cls_dataset.build_cls_datasets"),
])
def test_training_hands_its_split_file_to_the_datasets(train, cls, builder, tmp_path, monkeypatch):
    import importlib

    seen = {}

    def fake_build(data, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(builder, fake_build)
    module, name = train.rsplit(".", 1)
    with pytest.raises(RuntimeError, match="stop"):
        getattr(importlib.import_module(module), name)(cls(data=str(tmp_path), out=str(tmp_path / "run"),
                                                            split="split.json", device="cpu"))
    assert seen["split_file"] == "split.json" and seen["val_fraction"] == nodulekit.VAL_FRACTION


def test_console_log_follows_the_current_stderr(monkeypatch):
    """The CLI's log handler writes to the stderr of the moment: a stream that an earlier caller
    redirected to and closed must not turn later log lines into logging errors."""
    import io
    import logging

    from nodulekit.log import get_logger, setup_logging

    root = logging.getLogger("nodulekit")
    monkeypatch.setattr(root, "handlers", [])
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    setup_logging()
    get_logger("test").info("one")
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    get_logger("test").info("two")
    assert second.getvalue() == "[nodulekit.test] two\n"
