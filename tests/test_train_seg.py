import subprocess
import sys

import numpy as np
import pytest
import torch

from nodulekit.data.seg_dataset import SegScan, SegTrainDataset, SegValDataset
from nodulekit.models.checkpoint import load_seg_model, read_checkpoint
from nodulekit.models.unet import SegModel, UNetWidths
from nodulekit.train.losses import dice_loss, soft_dice_loss
from nodulekit.train.seg import best_key, fit_seg, lr_factor, recall_key

TINY = UNetWidths(down=((4, 4), (8, 8)), up=((4, 4, 4),))


def test_dice_loss_on_hand_made_cases():
    label = torch.zeros(2, 1, 16, 16)
    label[:, :, 4:8, 4:8] = 1
    assert float(dice_loss(label.clone(), label)) < 0.05  # perfect
    zeros = torch.zeros_like(label)
    assert float(dice_loss(zeros, label, fn_weight=8.0)) == pytest.approx(9 * (1 - 1 / 17))  # misses cost 1 + 8
    assert float(dice_loss(zeros, label, fn_weight=0.0)) == pytest.approx(1 - 1 / 17)
    everything = torch.ones_like(label)
    # predicting everything costs only the plain Dice term: the fn term is satisfied
    assert float(dice_loss(everything, label)) == pytest.approx(1 - 2 * 16 / (256 + 16), abs=0.02)
    assert float(dice_loss(everything, label)) < float(dice_loss(zeros, label))


def test_batch_dice_keeps_learning_from_background_crops():
    # one crop with a nodule, one without, both with 64 false-positive pixels
    label = torch.zeros(2, 1, 16, 16)
    label[0, :, 4:8, 4:8] = 1
    pred = label.clone()
    pred[:, :, 8:16, 8:16] = 0.9
    assert float(dice_loss(label.clone(), label, batch_dice=True)) < 0.05
    assert float(dice_loss(torch.zeros_like(label), label, fn_weight=0.0, batch_dice=True)) == pytest.approx(
        1 - 1 / 17)

    def grad_on_background_crop(batch_dice):
        p = pred.clone().requires_grad_(True)
        dice_loss(p, label, batch_dice=batch_dice).backward()
        return float(p.grad[1, 0, 8:16, 8:16].mean())

    # per crop, the empty crop's Dice is saturated (1 - 1/(57.6 + 1)): its false positives barely
    # matter; pooled, every false positive pixel still lowers the Dice of the batch
    assert grad_on_background_crop(False) < 2e-4
    assert grad_on_background_crop(True) > 10 * grad_on_background_crop(False)


def test_area_cap_keeps_a_big_nodule_from_drowning_the_false_positives_elsewhere():
    # crop 0: a big nodule filling 1,024 pixels; crop 1: background with 64 false-positive pixels
    label = torch.zeros(2, 1, 48, 48)
    label[0, :, 8:40, 8:40] = 1
    pred = label * 0.9
    pred[1, :, 8:16, 8:16] = 0.9

    def grad_on_false_positives(area_cap):
        p = pred.clone().requires_grad_(True)
        dice_loss(p, label, batch_dice=True, area_cap=area_cap).backward()
        return float(p.grad[1, 0, 8:16, 8:16].mean())

    # weighted 64/1024, the big crop counts as a 64-pixel nodule: the 64 false positives weigh
    # about as much as its whole nodule instead of 1/16 of it
    assert grad_on_false_positives(64.0) > 5 * grad_on_false_positives(None) > 0  # 7.8x
    # with small nodules only (below the cap) the weights are all 1: plain pooling
    small = torch.zeros(2, 1, 16, 16)
    small[0, :, 4:8, 4:8] = 1
    p = small * 0.5
    assert float(dice_loss(p, small, batch_dice=True, area_cap=64.0)) == pytest.approx(
        float(dice_loss(p, small, batch_dice=True)))
    with pytest.raises(ValueError, match="pooled"):
        soft_dice_loss(p, small, weights=torch.ones(2))


def test_lr_schedule():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.05, abs=0.01)


def test_recall_key_stops_rewarding_recall_past_the_target():
    marks_all = {"nodule_recall": 1.0, "recall": 0.90, "dice": 0.10}
    precise = {"nodule_recall": 1.0, "recall": 0.52, "dice": 0.35}
    short = {"nodule_recall": 1.0, "recall": 0.40, "dice": 0.45}
    assert recall_key(marks_all) > recall_key(precise) > recall_key(short)
    # with the baseline's recall (0.5) as target, keeping it is enough and Dice decides
    assert recall_key(precise, 0.5) > recall_key(marks_all, 0.5) > recall_key(short, 0.5)
    assert recall_key({"nodule_recall": 0.5, "recall": 0.9, "dice": 0.9}, 0.5) < recall_key(short, 0.5)


def test_best_key_prefers_nodule_recall_then_dice():
    a = {"nodule_recall": 1.0, "recall": 0.8, "dice": 0.5}
    b = {"nodule_recall": 0.9, "recall": 1.0, "dice": 0.9}
    c = {"nodule_recall": 1.0, "recall": 0.4, "dice": 0.6}  # wide masks lose to tight ones
    assert best_key(a) > best_key(b) and best_key(c) > best_key(a)
    assert best_key({"recall": float("nan")}) < best_key(b)


def _scan(seed, n=12, size=48):
    rng = np.random.default_rng(seed)
    hu = (rng.normal(-800, 30, (n, size, size))).astype(np.int16)
    lab = np.zeros(hu.shape, np.uint16)
    z, y, x = np.mgrid[:n, :size, :size]
    for k in (1, 2):
        c = rng.integers([3, 10, 10], [n - 3, size - 10, size - 10])
        m = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 9
        hu[m], lab[m] = 40, k
    return SegScan.from_labels(f"s{seed}", hu, lab, {1: 6.0, 2: 4.0})


def _data(seed=0):
    train = SegTrainDataset([_scan(0), _scan(1)], samples_per_epoch=16, crop=32, window=40, seed=seed)
    return train, SegValDataset([_scan(2)], negative_slices=2)


def _fit(out, epochs, **kw):
    torch.manual_seed(0)
    model = SegModel(TINY)
    train, val = _data()
    hist = fit_seg(model, train, val, epochs=epochs, lr=1e-2, batch_size=4, seed=0, out_dir=out, progress=False,
                   keep_best=False, **kw)
    return model, hist


def test_fit_seg_is_deterministic_and_writes_the_run(tmp_path):
    m1, h1 = _fit(tmp_path / "a", 1)
    m2, h2 = _fit(tmp_path / "b", 1)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert h1[0]["loss"] == h2[0]["loss"]
    assert {"loss", "recall", "precision", "dice", "nodule_recall", "nodule_recall_ge5"} <= set(h1[0])
    for name in ("seg.pt", "seg_last.pt", "log.csv"):
        assert (tmp_path / "a" / name).is_file()
    assert any((tmp_path / "a" / "tb").iterdir())
    model, ckpt = load_seg_model(tmp_path / "a" / "seg.pt")
    assert model.widths == TINY and ckpt["epoch"] == 1
    last = read_checkpoint(tmp_path / "a" / "seg_last.pt")
    assert {"optimizer_state", "epoch", "rng", "history"} <= set(last)


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    straight, _ = _fit(tmp_path / "straight", 2)

    def kill(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt  # as if the process died right after the first checkpoint

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "killed", 2, on_epoch_end=kill)
    resumed, hist = _fit(tmp_path / "killed", 2, resume=True)
    assert [r["epoch"] for r in hist] == [1, 2]
    for (k, v1), v2 in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v1, v2), k
    log = (tmp_path / "killed" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header + 2 epochs


def test_fit_seg_with_custom_mode_setters_and_no_out_dir():
    calls = []
    model = SegModel(TINY)
    train, val = _data()
    fit_seg(model, train, val, epochs=1, lr=1e-3, batch_size=8, seed=0, progress=False,
            set_train_mode=lambda m: calls.append("train") or m.train(),
            set_eval_mode=lambda m: calls.append("eval") or m.eval())
    assert calls == ["train", "eval"]


def test_cli_train_without_model_prints_help(capsys):
    from nodulekit.cli import main

    assert main(["train"]) == 2
    assert "seg" in capsys.readouterr().out


def test_cli_train_seg_smoke(synth_data, tmp_path):
    from nodulekit.cli import main

    out = tmp_path / "run"
    args = ["train", "seg", "--data", str(synth_data), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "4", "--val-negative-slices", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert (out / "seg.pt").is_file() and (out / "log.csv").is_file() and (out / "summary.json").is_file()
    assert main(args) == 1  # refuses to overwrite a run without --resume
    assert main([*args[:6], "--epochs", "2", *args[8:], "--resume"]) == 0
    assert read_checkpoint(out / "seg_last.pt")["epoch"] == 2


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(synth_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "nodulekit", "train", "seg", "--data", str(synth_data), "--out", str(out), "--epochs", "1",
           "--steps-per-epoch", "2", "--batch-size", "4", "--threads", "1", "--no-progress", "--device", "cpu",
           "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = read_checkpoint(out / "seg_last.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model_state"])
    assert len((out / "log.csv").read_text().splitlines()) == 2
