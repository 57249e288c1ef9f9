import json

import numpy as np
import pytest

from nodulekit.models.checkpoint import load_cls_model, read_checkpoint
from nodulekit.train.cls import auc_score, cls_metrics, roc_curve


@pytest.mark.parametrize("labels, scores, auc", [
    ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),
    ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),
    ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
    ([0, 1, 0, 1], [0.1, 0.3, 0.35, 0.8], 0.75),
])
def test_auc(labels, scores, auc):
    assert auc_score(np.array(labels), np.array(scores)) == pytest.approx(auc)


def test_auc_needs_both_classes():
    assert np.isnan(auc_score(np.array([1, 1]), np.array([0.2, 0.3])))


def test_roc_curve_ends():
    fpr, tpr, thr = roc_curve(np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.isinf(thr[0])


def test_cls_metrics_on_hand_made_predictions():
    labels = np.array([1] * 20 + [0] * 200)
    probs = np.r_[np.linspace(0.6, 1.0, 19), 0.05, np.linspace(0.0, 0.45, 190), np.linspace(0.7, 0.9, 10)]
    m = cls_metrics(labels, probs, recall_target=0.95)
    assert (m["positives"], m["negatives"]) == (20, 200)
    assert m["recall"] == pytest.approx(19 / 20) and m["precision"] == pytest.approx(19 / 29)
    assert m["f1"] == pytest.approx(2 * 19 / (2 * 19 + 10 + 1))
    # keeping 95 % of nodules (threshold at the 19th-highest nodule, 0.6) lets 10 of 200 negatives through
    assert m["fp_kept"] == pytest.approx(10 / 200) and m["fp_reduction"] == pytest.approx(20.0)
    assert 0.9 < m["auc"] < 1.0


def test_cli_train_cls_smoke(synth_data, tmp_path):
    from nodulekit.cli import main

    out = tmp_path / "run"
    args = ["train", "cls", "--data", str(synth_data), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "4", "--val-max-negatives", "20", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--no-norm"]  # batch norm is the default (see the next test): the plain dlwpt training here
    assert main(args) == 0
    for name in ("cls.pt", "cls_last.pt", "log.csv", "roc.png", "summary.json"):
        assert (out / name).is_file(), name
    model, ckpt = load_cls_model(out / "cls.pt")
    assert ckpt["epoch"] == 1 and "auc" in ckpt["metrics"] and ckpt["config"]["norm"] is False
    assert not any(".bn" in k for k in read_checkpoint(out / "cls_last.pt")["model_state"])
    assert main([*args[:6], "--epochs", "2", *args[8:], "--resume"]) == 0
    assert read_checkpoint(out / "cls_last.pt")["epoch"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [r["epoch"] for r in summary["history"]] == [1, 2]


def test_norm_run_saves_the_dlwpt_layout_and_resumes(synth_data, tmp_path):
    from nodulekit.train.cls import ClsTrainConfig, train_cls

    cfg = dict(data=str(synth_data), out=str(tmp_path / "run"), epochs=1, steps_per_epoch=2, batch_size=4,
               val_max_negatives=20, progress=False, cache_dir=str(tmp_path / "cache"), norm=True)
    train_cls(ClsTrainConfig(**cfg))
    saved = read_checkpoint(tmp_path / "run" / "cls.pt")["model_state"]
    assert not any(".bn" in k for k in saved) and "block1.conv1.weight" in saved
    assert any(".bn1." in k for k in read_checkpoint(tmp_path / "run" / "cls_last.pt")["model_state"])
    result = train_cls(ClsTrainConfig(**{**cfg, "epochs": 2, "resume": True}))
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert load_cls_model(tmp_path / "run" / "cls.pt")[0].norm is False


def test_a_weight_average_is_validated_saved_and_resumed(synth_data, tmp_path, monkeypatch):
    import torch

    import nodulekit.train.cls as cls_module
    from nodulekit.train.cls import ClsTrainConfig, train_cls

    scored = []
    real_scorer = cls_module.fast_scorer

    def spy(model, device="cpu"):
        scored.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_scorer(model, device)

    monkeypatch.setattr(cls_module, "fast_scorer", spy)
    cfg = dict(data=str(synth_data), out=str(tmp_path / "run"), epochs=1, steps_per_epoch=3, batch_size=4,
               val_max_negatives=20, progress=False, cache_dir=str(tmp_path / "cache"), ema=0.5,
               flip_slices=True, hard_pool=0)
    train_cls(ClsTrainConfig(**cfg))
    last = read_checkpoint(tmp_path / "run" / "cls_last.pt")
    average = {k[len("module."):]: v for k, v in last["ema_state"].items() if k.startswith("module.")}
    assert int(last["ema_state"]["n_averaged"]) == 3  # one update per step
    # validation scored the average, not the weights the optimizer left
    assert len(scored) == 1 and all(torch.equal(scored[0][k], v) for k, v in average.items())
    assert not all(torch.equal(last["model_state"][k], v) for k, v in average.items())
    # cls.pt holds the average with its batch norms merged, as the detector loads it
    from nodulekit.models.classifier import LunaModel

    merged = LunaModel(norm=True)
    merged.load_state_dict(average)
    merged.crop_spacing = None
    saved = read_checkpoint(tmp_path / "run" / "cls.pt")["model_state"]
    assert all(torch.allclose(saved[k], v) for k, v in merged.eval().folded().state_dict().items())
    assert read_checkpoint(tmp_path / "run" / "cls.pt")["config"]["flip_slices"] is True
    result = train_cls(ClsTrainConfig(**{**cfg, "epochs": 2, "resume": True}))
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert int(read_checkpoint(tmp_path / "run" / "cls_last.pt")["ema_state"]["n_averaged"]) == 6
    with pytest.raises(ValueError, match="ema"):
        train_cls(ClsTrainConfig(**{**cfg, "out": str(tmp_path / "x"), "ema": 1.0}))


def test_keep_last_epoch_with_detector_negatives(synth_data, tmp_path, monkeypatch):
    import nodulekit.train.cls as cls_module
    from nodulekit.data.luna import candidates_table, read_candidates, write_candidates
    from nodulekit.train.cls import ClsTrainConfig, train_cls

    picks, highest_scoring = [], cls_module.highest_scoring

    def recording(model, samples, crops, keep, *args, **kwargs):
        out = highest_scoring(model, samples, crops, keep, *args, **kwargs)
        picks.append((kwargs.get("what"), len(samples), keep, len(out)))
        return out

    monkeypatch.setattr(cls_module, "highest_scoring", recording)
    # stand-in detector table: about 200 of the dataset's own non-nodules, from every scan, moved by 3 mm
    detector = tmp_path / "detector.csv"
    negatives = [c for c in read_candidates(candidates_table(synth_data)) if not c.is_nodule]
    write_candidates(detector, [type(c)(c.seriesuid, tuple(v + 3.0 for v in c.center_xyz), False)
                                for c in negatives[:: max(1, len(negatives) // 200)]])
    cfg = ClsTrainConfig(data=str(synth_data), out=str(tmp_path / "run"), epochs=2, steps_per_epoch=2, batch_size=4,
                         val_max_negatives=20, progress=False, cache_dir=str(tmp_path / "cache"), keep="last",
                         detector_candidates=str(detector), detector_from_epoch=2, detector_hard=50, val_every=2)
    result = train_cls(cfg)
    picked = [p for p in picks if p[0] == "detector negatives"]
    assert len(picked) == 1 and picked[0][1] > 50 and picked[0][2:] == (50, 50)  # before epoch 2 alone
    assert read_checkpoint(tmp_path / "run" / "cls.pt")["epoch"] == 2 and result["best"]["epoch"] == 2
    assert "auc" not in result["history"][0] and "auc" in result["history"][1]  # validated every 2nd epoch
    with pytest.raises(ValueError, match="keep"):
        train_cls(ClsTrainConfig(data=str(synth_data), out=str(tmp_path / "x"), keep="median"))


def test_predict_cls_scores_a_normed_model_as_its_eval_mode():
    """predict_cls scores a model trained with batch norms through its merged copy: the same
    probabilities as the normed model in eval mode (to 1e-4), and the model is left unchanged."""
    import torch

    from nodulekit.models.classifier import LunaModel
    from nodulekit.train.cls import predict_cls

    torch.manual_seed(0)
    model = LunaModel(norm=True)
    for m in model.modules():  # running statistics away from the identity, as after training
        if isinstance(m, torch.nn.BatchNorm3d) and m.num_features > 1:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    model.tail_batchnorm.running_mean.fill_(-500.0)
    model.tail_batchnorm.running_var.fill_(500.0 ** 2)
    torch.nn.init.normal_(model.head_linear.weight, std=0.05)
    crops = torch.rand(6, 1, 32, 48, 48) * 2000 - 1000
    ds = [(crops[i], i % 2) for i in range(len(crops))]
    labels, probs = predict_cls(model, ds, batch_size=4)
    model.eval()
    with torch.no_grad():
        expected = model(crops)[1][:, 1].numpy()
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert np.ptp(expected) > 1e-3  # the check below tells models apart
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert hasattr(model.block1, "bn1")


def test_fast_scorer_scores_as_the_model(monkeypatch):
    """The OpenVINO scorer that training mines and validates with gives the torch model's
    probabilities (to 1e-4) and leaves the model in the mode it found; without OpenVINO, or for a
    model it cannot export, the model itself scores."""
    pytest.importorskip("openvino")
    import torch

    from nodulekit.deploy import openvino as ov_mod
    from nodulekit.models.classifier import LunaModel
    from nodulekit.train.cls import fast_scorer, predict_cls

    torch.manual_seed(1)
    model = LunaModel(norm=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_var.uniform_(0.5, 2.0)
    model.tail_batchnorm.running_mean.fill_(-300.0)
    model.tail_batchnorm.running_var.fill_(400.0 ** 2)
    torch.nn.init.normal_(model.head_linear.weight, std=0.05)
    crops = torch.rand(9, 1, 32, 48, 48) * 2000 - 1000
    ds = [(crops[i], i % 2) for i in range(len(crops))]
    model.train()
    scorer = fast_scorer(model)
    assert model.training and not isinstance(scorer, torch.nn.Module)
    labels, fast = predict_cls(scorer, ds, batch_size=4)
    _, slow = predict_cls(model, ds, batch_size=4)
    assert labels.tolist() == [i % 2 for i in range(9)] and np.ptp(slow) > 1e-3
    np.testing.assert_allclose(fast, slow, atol=1e-4)
    monkeypatch.setattr(ov_mod, "openvino_available", lambda: False)
    assert fast_scorer(model) is model


def test_init_keeps_the_checkpoints_widths(synth_data, tmp_path):
    """--init starts from a checkpoint of other widths (a pruned classifier) with batch norms added on
    top, and the saved classifier keeps those widths in dlwpt's layout."""
    import torch

    from nodulekit.models.checkpoint import save_cls_checkpoint
    from nodulekit.models.classifier import LunaModel
    from nodulekit.train.cls import ClsTrainConfig, train_cls

    widths = [(8, 8), (8, 16), (16, 24), (24, 32)]
    torch.manual_seed(0)
    save_cls_checkpoint(tmp_path / "small.pt", LunaModel(widths=widths))
    train_cls(ClsTrainConfig(data=str(synth_data), out=str(tmp_path / "run"), epochs=1, steps_per_epoch=2,
                             batch_size=4, val_max_negatives=20, progress=False, cache_dir=str(tmp_path / "cache"),
                             init=str(tmp_path / "small.pt")))
    model, _ = load_cls_model(tmp_path / "run" / "cls.pt")
    assert model.widths == widths and not model.norm


def test_detector_negatives_scored_every_few_epochs(synth_data, tmp_path, monkeypatch):
    """``detector_every=2`` scores the detector's negatives before epochs 2 and 4 of 5, and epochs 3
    and 5 draw from the picks before them; a resumed run scores at once (its picks were not saved)."""
    import nodulekit.train.cls as cls_module
    from nodulekit.data.cls_dataset import ClsTrainDataset
    from nodulekit.data.luna import candidates_table, read_candidates, write_candidates
    from nodulekit.train.cls import ClsTrainConfig, train_cls

    scored, drawn = [], []
    highest_scoring, set_share = cls_module.highest_scoring, ClsTrainDataset.set_detector_share

    def recording(model, samples, crops, keep, *args, **kwargs):
        out = highest_scoring(model, samples, crops, keep, *args, **kwargs)
        if kwargs.get("what") == "detector negatives":
            scored.append(out)
        return out

    def share(self, share, pick=None):
        drawn.append((self.epoch + 1, share, None if pick is None else tuple(pick)))
        set_share(self, share, pick)

    monkeypatch.setattr(cls_module, "highest_scoring", recording)
    monkeypatch.setattr(ClsTrainDataset, "set_detector_share", share)
    detector = tmp_path / "detector.csv"
    negatives = [c for c in read_candidates(candidates_table(synth_data)) if not c.is_nodule]
    write_candidates(detector, [type(c)(c.seriesuid, tuple(v + 3.0 for v in c.center_xyz), False)
                                for c in negatives[:: max(1, len(negatives) // 100)]])

    def run(out: str, epochs: int, **kw):
        return train_cls(ClsTrainConfig(
            data=str(synth_data), out=str(tmp_path / out), epochs=epochs, steps_per_epoch=1, batch_size=4,
            val_max_negatives=10, val_every=10, progress=False, cache_dir=str(tmp_path / "cache"), keep="last",
            hard_pool=0, detector_candidates=str(detector), detector_from_epoch=2, detector_hard=20,
            detector_every=2, **kw))

    run("every2", 5)
    assert len(scored) == 2  # before epochs 2 and 4
    first, second = (tuple(p) for p in scored)
    assert [d[0] for d in drawn] == [1, 2, 3, 4, 5] and drawn[0][1] == 0.0
    assert [d[2] for d in drawn[1:]] == [first, first, second, second]
    scored.clear()
    drawn.clear()
    run("resumed", 2)  # 2 epochs, then resumed for epoch 3, which lies between two scorings
    run("resumed", 3, resume=True)
    assert len(scored) == 2 and drawn[-1] == (3, 0.5, tuple(scored[-1]))


def test_a_context_classifier_trains_saves_and_classifies_a_scan(synth_data, tmp_path):
    """``--context``: two-channel crops from the dataset, inserted nodules included; the checkpoint
    and its deployed form carry the factor, and detection cuts both channels for it."""
    import copy

    from nodulekit.cli import main
    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.luna import find_series
    from nodulekit.deploy.runtime import load_cls_runner
    from nodulekit.detect.candidates import Finding, classify
    from nodulekit.errors import InputError
    from nodulekit.train.cls import ClsTrainConfig, train_cls

    out = tmp_path / "run"
    assert main(["train", "cls", "--data", str(synth_data), "--out", str(out), "--epochs", "1", "--steps-per-epoch",
                 "2", "--batch-size", "4", "--val-max-negatives", "20", "--no-progress", "--cache-dir",
                 str(tmp_path / "cache"), "--context", "2.5", "--insert-share", "1"]) == 0
    model, ckpt = load_cls_model(out / "cls.pt")
    assert (model.context, model.in_channels, ckpt["config"]["context"]) == (2.5, 2, 2.5)
    ct = VolumeCache(tmp_path / "cache").get(next(iter(find_series(synth_data).values())))
    found = [Finding(center_irc=tuple(float(n // 2) for n in ct.hu.shape), center_xyz=(0.0, 0.0, 0.0),
                     diameter_mm=5.0, volume_mm3=65.0, n_voxels=100, bbox=(slice(0, 1),) * 3, label=1)]
    probs = []
    for backend in ("torch", "openvino"):
        runner = load_cls_runner(out / "cls.pt", backend=backend, threads=2)
        assert runner.context == 2.5
        cands = copy.deepcopy(found)
        classify(ct, cands, runner)
        probs.append(cands[0].probability)
    assert 0 <= probs[0] <= 1 and abs(probs[0] - probs[1]) <= 1e-4
    # a run that starts from it keeps its context; one that asks for another is refused in one line
    with pytest.raises(InputError, match="context"):
        train_cls(ClsTrainConfig(data=str(synth_data), out=str(tmp_path / "again"), epochs=1, steps_per_epoch=1,
                                 batch_size=4, progress=False, cache_dir=str(tmp_path / "cache"),
                                 init=str(out / "cls.pt"), context=3.0))
    with pytest.raises(InputError, match="native voxels"):
        train_cls(ClsTrainConfig(data=str(synth_data), out=str(tmp_path / "native"), epochs=1, steps_per_epoch=1,
                                 batch_size=4, progress=False, cache_dir=str(tmp_path / "cache"), crop_spacing=None,
                                 context=2.0))
