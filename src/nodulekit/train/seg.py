"""Training the candidate-segmentation U-Net.

:class:`SegTrainConfig` holds the defaults (the CLI's too); :func:`train_seg` builds the data and
the model from it and calls :func:`fit_seg`, the loop that pruning fine-tuning and
quantization-aware training reuse with their own models.

Run folder: ``seg.pt`` (best by nodule recall, then Dice), ``seg_last.pt`` (resume: model, optimizer, epoch, RNG),
``log.csv``, ``tb/`` (scalars and overlay images), ``summary.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from nodulekit import SEG_THRESHOLD
from nodulekit.data.augment import RandAffine
from nodulekit.evaluate.seg_metrics import evaluate_seg
from nodulekit.log import get_logger
from nodulekit.models.checkpoint import atomic_torch_save, read_checkpoint, save_seg_checkpoint
from nodulekit.models.unet import SegModel
from nodulekit.train import _runlog
from nodulekit.train.config import POSITIVE, SHARE, TrainConfig, setting
from nodulekit.train.ddp import barrier, cleanup, current_context, init_distributed, mean_across, wrap_model
from nodulekit.train.losses import dice_loss

log = get_logger("train")


@dataclass
class SegTrainConfig(TrainConfig):
    """Settings of a segmentation run; the shared ones are :class:`nodulekit.train.config.TrainConfig`'s."""

    out: str = setting("runs/seg", "run folder (seg.pt, seg_last.pt, log.csv, tb/, summary.json)")
    steps_per_epoch: int = setting(100, "optimizer steps per epoch (per process under DDP)", check=POSITIVE)
    lr: float = setting(2e-3, "peak Adam learning rate (linear warm-up, then cosine decay to 5 %)", check=POSITIVE)
    # dlwpt's 8 can make marking every dense structure the loss's optimum (nodulekit.train.losses)
    fn_weight: float = setting(2.0, "weight of the false-negative Dice term")
    batch_dice: bool = setting(True, "Dice pooled over the batch; per crop (dlwpt's) stops learning from background "
                                     "crops, see nodulekit.train.losses")
    dice_area_cap: float | None = setting(64.0, "nodule pixels beyond which a crop weighs less in the pooled Dice, "
                                                "so that crops of big nodules do not drown the false positives of "
                                                "the others (0: off)", zero_is_none=True)
    prior: float = setting(0.01, "initial nodule probability of every pixel (output bias) of a fresh model")
    negative_share: float = setting(0.3, "share of background crops; the rest are centred near nodule voxels",
                                    check=SHARE)
    lookalike_share: float = setting(0.5, "share of the background crops centred near a non-nodule candidate of "
                                          "candidates.csv (vessels seen end-on, airway walls: the hard negatives); "
                                          "the others lie anywhere in the body", check=SHARE)
    crop: int = setting(64, "training crop side", check=POSITIVE)
    window: int = setting(96, "side of the square around a nodule voxel a nodule crop is taken from",
                          check=POSITIVE)
    val_negative_slices: int = setting(8, "nodule-free validation slices per held-out scan")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5 % at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def best_key(row: dict) -> tuple:
    """Ranking of a validation row for the best checkpoint: nodule-level recall first (a missed
    nodule cannot be recovered later), then Dice.

    Pixel recall alone would pick the early epochs that mark wide regions around every dense
    structure: their 3D components merge nodules with vessels, and the component's centre then
    falls outside the nodule. Dice rewards masks that cover nodules and little else.
    """

    def f(k):
        v = row.get(k, float("nan"))
        return -1.0 if v is None or not math.isfinite(v) else float(v)

    return (f("nodule_recall"), f("dice"))


def recall_key(row: dict, target: float | None = None) -> tuple:
    """Ranking for fine-tuning a compressed model that must keep the baseline's recall: nodule
    recall, then pixel recall (to 0.01, so that a model predicting everything cannot win on it
    alone), then Dice. With ``target`` (the baseline's pixel recall), recall above it counts as
    equal: among the epochs that keep the baseline's recall, the best Dice wins instead of the one
    that marks the most."""
    k = best_key(row)
    v = row.get("recall", float("nan"))
    v = -1.0 if v is None or not math.isfinite(v) else round(float(v), 2)
    if target is not None:
        v = min(v, round(float(target), 2))
    return (k[0], v, k[1])


def init_output_prior(model: SegModel, prior: float = 0.01) -> None:
    """Set the final bias so that every pixel starts at probability ``prior``.

    From the default start (0.5 everywhere) the heavily weighted false-negative term is met at
    once by calling everything a nodule, and the plain Dice term pulls back only weakly from
    there. Starting near "no nodule anywhere" lets predictions grow on nodules alone.
    """
    with torch.no_grad():
        model.unet.last.bias.fill_(math.log(prior / (1 - prior)))


def torch_predictor(model: torch.nn.Module, device: torch.device | str = "cpu",
                    memory_format: torch.memory_format = torch.contiguous_format) -> Callable:
    """``np.float32 (N, 7, H, W) -> (N, 1, H, W)`` for :func:`evaluate_seg` (model in eval mode)."""

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            t = torch.from_numpy(x).to(device).contiguous(memory_format=memory_format)
            return model(t).float().contiguous().cpu().numpy()

    return predict


def fast_predictor(model: torch.nn.Module, device: torch.device | str = "cpu",
                   memory_format: torch.memory_format = torch.contiguous_format) -> Callable:
    """What predicts validation slices fastest for :func:`evaluate_seg`: on a CPU with OpenVINO
    installed, a plain :class:`SegModel` (baseline or pruned) exported to ONNX and compiled by
    OpenVINO; else :func:`torch_predictor`.

    Validation runs whole 512x512 slices, where OpenVINO is about 3x faster than PyTorch on a CPU,
    with the same probabilities to float rounding (the export parity tests), so the thresholded
    metrics are the same; exporting and compiling cost about a second. Fake-quantized (QAT) models
    stay in PyTorch: their quantizers are what is being validated.
    """
    import copy

    from nodulekit.deploy.openvino import openvino_available

    if type(model) is not SegModel or torch.device(device).type != "cpu" or not openvino_available():
        return torch_predictor(model, device, memory_format)
    from nodulekit.deploy.export import export_onnx
    from nodulekit.deploy.openvino import compile_module

    # the exporter traces contiguous weights; the training model keeps its layout
    return compile_module(copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval(), export_onnx)


def _overlay(image7: np.ndarray, labels: np.ndarray, prob: np.ndarray) -> np.ndarray:
    # gray CT (centre slice), label in green, prediction above the threshold in red
    gray = (np.clip(image7[image7.shape[0] // 2], -1000, 1000) + 1000) / 2000
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[labels > 0, 1] = 1.0
    rgb[prob > SEG_THRESHOLD, 0] = 1.0
    return rgb.astype(np.float32)


def _save(path: Path, model: torch.nn.Module, **extra) -> None:
    if isinstance(model, SegModel):
        save_seg_checkpoint(path, model, **extra)
    else:  # e.g. an exported fake-quant graph: the caller knows how to rebuild it
        atomic_torch_save({"model_state": model.state_dict(), **extra}, path)


def fit_seg(model: torch.nn.Module, train_ds, val_ds, *, epochs: int, lr: float,
            fn_weight: float = SegTrainConfig.fn_weight, batch_dice: bool = SegTrainConfig.batch_dice,
            dice_area_cap: float | None = SegTrainConfig.dice_area_cap, batch_size: int = SegTrainConfig.batch_size, workers: int = 0, seed: int = 0, out_dir: str | Path | None = None,
            set_train_mode: Callable | None = None, set_eval_mode: Callable | None = None,
            augment: bool | RandAffine | None = True, resume: bool = False, warmup_fraction: float = 0.05,
            val_every: int = 1, val_batch_size: int = 4, channels_last: bool = False,
            config: dict | None = None, on_epoch_end: Callable | None = None, keep_best: bool = True,
            rank: Callable[[dict], tuple] = best_key, device: str | torch.device | None = None,
            progress: bool = True) -> list[dict]:
    """Train a segmentation model on crops and validate it on whole slices after every epoch.

    Works in one process or under ``torchrun`` (DDP, joined beforehand with
    :func:`nodulekit.train.ddp.init_distributed`); rank 0 validates and writes the run folder.

    Args:
        model: maps ``(N, 7, H, W)`` to ``(N, 1, H, W)`` probabilities (SegModel, pruned SegModel,
            fake-quant graph, ...).
        train_ds: yields ``(image (7, h, w), label (1, h, w))``; ``set_epoch(epoch)`` is called
            when it has one.
        val_ds: a :class:`nodulekit.data.seg_dataset.SegValDataset`, or None to skip validation.
        epochs: total epochs (a resumed run continues up to this number).
        lr: peak learning rate of Adam (warm-up, then cosine decay).
        fn_weight: false-negative weight of :func:`nodulekit.train.losses.dice_loss`.
        batch_dice: Dice pooled over the batch (``dice_loss(batch_dice=...)``).
        dice_area_cap: ``dice_loss(area_cap=...)``.
        batch_size: crops per step and process.
        workers: DataLoader workers.
        seed: seed of augmentation and shuffling.
        out_dir: run folder (``seg.pt``, ``seg_last.pt``, ``log.csv``, ``tb/``); None writes nothing.
        set_train_mode, set_eval_mode: callables taking the model, for models whose ``.train()`` /
            ``.eval()`` do not work (exported graphs); default ``model.train()`` / ``model.eval()``.
        augment: True for the default :class:`RandAffine`, an instance, or False/None.
        resume: continue from ``out_dir/seg_last.pt`` if it exists.
        warmup_fraction: share of the steps with a linear learning-rate warm-up.
        val_every: validate every this many epochs, and always after the last one (whole-slice
            validation costs about as much as a few hundred training steps on a CPU).
        val_batch_size: slices per validation forward pass.
        channels_last: run the model with channels-last tensors (about 20 % faster training and 35 %
            faster validation of a SegModel on the CPU); leave off for graphs that fix their layout.
        config: plain values stored in the checkpoints.
        on_epoch_end: called with each epoch's row after the checkpoints are written.
        keep_best: load the best weights into ``model`` at the end (when validating).
        rank: sort key of validation rows for "best" (:func:`best_key`, or :func:`recall_key`).
        device: torch device (default CPU).
        progress: progress bars.

    Returns:
        One row per epoch: ``epoch``, ``loss``, ``lr``, ``seconds``, ``data_s``, ``aug_s`` and the
        validation metrics of :func:`evaluate_seg`.
    """
    from tqdm import tqdm

    dev = torch.device(device) if device is not None else torch.device("cpu")
    ctx = current_context(dev)
    out = Path(out_dir) if out_dir is not None else None
    writes = out is not None and ctx.is_main
    set_train = set_train_mode or (lambda m: m.train())
    set_eval = set_eval_mode or (lambda m: m.eval())
    aug = RandAffine() if augment is True else (augment or None)

    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(dev, memory_format=fmt)
    else:
        model.to(dev)
    net = wrap_model(model, ctx)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = (DistributedSampler(train_ds, ctx.world_size, ctx.rank, shuffle=False, drop_last=True)
               if ctx.distributed else None)
    loader = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                        drop_last=True, pin_memory=dev.type == "cuda")
    steps = len(loader)
    if steps == 0:
        raise ValueError(f"training set of {len(train_ds)} samples gives no batch of {batch_size}")
    total, warmup = epochs * steps, max(1, int(warmup_fraction * epochs * steps))

    history: list[dict] = []
    start, best, best_state = 0, None, None
    if resume and out is not None and (out / "seg_last.pt").is_file():
        ck = read_checkpoint(out / "seg_last.pt")
        model.load_state_dict(ck["model_state"])
        opt.load_state_dict(ck["optimizer_state"])
        start, history = int(ck["epoch"]), list(ck.get("history", []))
        best = tuple(ck["best_key"]) if ck.get("best_key") else None
        if best is not None and len(best) != len(rank({})):
            best = None  # a checkpoint ranked by another key: re-rank from the next epoch
        _runlog.set_rng_state(ck.get("rng"))
        if (out / "seg.pt").is_file():
            best_state = read_checkpoint(out / "seg.pt")["model_state"]
        log.info("resuming %s at epoch %d of %d", out / "seg_last.pt", start + 1, epochs)
    tb = _runlog.TensorBoard(out if writes else None)

    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch * 1009 + ctx.rank)
        set_train(model)
        loss_sum, data_s, aug_s, t_data = 0.0, 0.0, 0.0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and ctx.is_main), leave=False)
        for i, (x, y) in enumerate(bar):
            t1 = time.perf_counter()
            data_s += t1 - t_data
            if aug is not None:
                x, y = aug(x, y, generator=gen)
            aug_s += time.perf_counter() - t1
            step = epoch * steps + i
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, total, warmup)
            x = x.to(dev, non_blocking=True).contiguous(memory_format=fmt)
            loss = dice_loss(net(x), y.to(dev, non_blocking=True), fn_weight, batch_dice=batch_dice,
                             area_cap=dice_area_cap)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            t_data = time.perf_counter()
        row = {"epoch": epoch + 1, "loss": mean_across(loss_sum / steps, ctx), "lr": opt.param_groups[0]["lr"],
               "train_s": time.perf_counter() - t0, "data_s": data_s, "aug_s": aug_s}

        validate = (epoch + 1) % max(1, val_every) == 0 or epoch + 1 == epochs
        if ctx.is_main and validate and val_ds is not None and len(val_ds):
            set_eval(model)
            t2 = time.perf_counter()
            row.update(evaluate_seg(fast_predictor(model, dev, fmt), val_ds, batch_size=val_batch_size))
            row["val_s"] = time.perf_counter() - t2
            _overlays(tb, torch_predictor(model, dev, fmt), val_ds, epoch + 1)
        row["seconds"] = time.perf_counter() - t0
        row = _runlog.clean_row(row)
        history.append(row)
        if ctx.is_main:
            log.info("epoch %d/%d  loss %.4f  %s(%.0f s)", epoch + 1, epochs, row["loss"], _fmt(row), row["seconds"])

        improved = "recall" in row and (best is None or rank(row) > best)
        if improved:
            best = rank(row)
            if keep_best:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if writes:
            meta = {"epoch": epoch + 1, "metrics": row, "config": config or {}}
            if improved:
                _save(out / "seg.pt", model, **meta)
            _save(out / "seg_last.pt", model, **meta, optimizer_state=opt.state_dict(), history=history,
                  best_key=list(best) if best else None, rng=_runlog.rng_state())
            _runlog.write_csv(out / "log.csv", history)
            tb.scalars(row, epoch + 1, prefix="seg/")
        barrier(ctx)
        if on_epoch_end is not None:
            on_epoch_end(row)
    tb.close()
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
    return history


def _fmt(row: dict) -> str:
    keys = ("recall", "precision", "dice", "nodule_recall", "nodule_recall_ge5")
    return "".join(f"{k} {row[k]:.3f}  " for k in keys if k in row)


def _overlays(tb, predict, val_ds, step: int, n: int = 3) -> None:
    if tb.writer is None or not hasattr(val_ds, "items"):
        return
    seen = set()
    for i, (s, z) in enumerate(val_ds.items):
        if s in seen or z not in val_ds.scans[s].label_slices:
            continue
        seen.add(s)
        image, labels, _ = val_ds[i]
        prob = predict(image[None])[0, 0]
        tb.image(f"val/{val_ds.scans[s].uid[-12:]}", _overlay(image, labels, prob), step)
        if len(seen) >= n:
            break


def train_seg(cfg: SegTrainConfig) -> dict:
    """Train a segmentation model as ``cfg`` says (also under ``torchrun``).

    Returns:
        ``run_dir``, ``checkpoint`` (best), ``best`` (its validation row), ``history``, ``seconds``.
    """
    from nodulekit.data.seg_dataset import build_seg_datasets
    from nodulekit.errors import InputError
    from nodulekit.models.checkpoint import load_seg_model

    t0 = time.perf_counter()
    ctx = init_distributed(cfg.device)
    try:
        if ctx.device.type == "cpu":
            import os

            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // ctx.world_size))
        out = Path(cfg.out)
        if (out / "seg_last.pt").is_file() and not cfg.resume:
            raise InputError(out, "holds a segmentation run already: pass --resume to continue it, or another --out")
        cache = None
        if cfg.cache_dir:
            from nodulekit.data.cache import VolumeCache

            cache = VolumeCache(cfg.cache_dir)
        train_ds, val_ds = build_seg_datasets(
            cfg.data, val_fraction=cfg.val_fraction, split_file=cfg.split,
            samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size * ctx.world_size, crop=cfg.crop, window=cfg.window,
            negative_share=cfg.negative_share, lookalike_share=cfg.lookalike_share,
            val_negative_slices=cfg.val_negative_slices, seed=cfg.seed, cache=cache,
            progress=cfg.progress and ctx.is_main)
        torch.manual_seed(cfg.seed)
        if cfg.init:
            model = load_seg_model(cfg.init)[0]
        else:
            model = SegModel()
            init_output_prior(model, cfg.prior)
        config = {k: v for k, v in asdict(cfg).items()}
        log.info("training U-Net (%d parameters) on %d scans, %d epochs x %d steps x %d crops, %d process(es)",
                 sum(p.numel() for p in model.parameters()), len(train_ds.scans), cfg.epochs, cfg.steps_per_epoch,
                 cfg.batch_size, ctx.world_size)
        history = fit_seg(model, train_ds, val_ds, epochs=cfg.epochs, lr=cfg.lr, fn_weight=cfg.fn_weight,
                          batch_dice=cfg.batch_dice, dice_area_cap=cfg.dice_area_cap,
                          batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed, out_dir=out,
                          augment=cfg.augment, resume=cfg.resume, val_every=cfg.val_every, config=config,
                          channels_last=ctx.device.type == "cpu", device=ctx.device,
                          progress=cfg.progress)
        scored = [r for r in history if "recall" in r]
        best = max(scored, key=best_key) if scored else (history[-1] if history else {})
        result = {"run_dir": str(out), "checkpoint": str(out / "seg.pt"), "best": best, "history": history,
                  "seconds": time.perf_counter() - t0}
        if ctx.is_main:
            (out / "summary.json").write_text(json.dumps(result, indent=2, default=float))
            log.info("best epoch %s: %s-> %s (%.0f s)", best.get("epoch"), _fmt(best), out / "seg.pt",
                     result["seconds"])
        return result
    finally:
        cleanup()
