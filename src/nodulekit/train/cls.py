"""Training the false-positive-reduction classifier (``LunaModel`` on ``nodulekit.CLS_CROP`` crops).

Run folder: ``cls.pt`` (best by AUC, or the last epoch), ``cls_last.pt`` (resume), ``log.csv``, ``tb/``, ``roc.png``,
``summary.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler

from nodulekit.data.augment import RandAffine
from nodulekit.data.crops import DEFAULT_CROP_SPACING
from nodulekit.log import get_logger
from nodulekit.models.checkpoint import read_checkpoint, save_cls_checkpoint
from nodulekit.models.classifier import LunaModel
from nodulekit.train import _runlog, threads
from nodulekit.train.config import FRACTION, POSITIVE, SHARE, TrainConfig, setting
from nodulekit.train.ddp import barrier, cleanup, init_distributed, mean_across, wrap_model
from nodulekit.train.seg import lr_factor

log = get_logger("train")

CHANNELS_LAST = torch.channels_last_3d
KEEP = ("best", "last")  # which epoch cls.pt holds


@dataclass
class ClsTrainConfig(TrainConfig):
    """Settings of a classifier run; the shared ones are :class:`nodulekit.train.config.TrainConfig`'s.
    A batch is half nodules, half non-nodules."""

    out: str = setting("runs/cls", "run folder (cls.pt, cls_last.pt, log.csv, tb/, roc.png, summary.json)")
    steps_per_epoch: int = setting(60, "optimizer steps per epoch (per process under DDP)", check=POSITIVE)
    lr: float = setting(1e-3, "peak Adam learning rate (warm-up, then cosine decay)", check=POSITIVE)
    # a candidate looks the same from head or feet, and detection scores its slice-mirrored crop too;
    # off by default, as it gained no CPM on the synthetic draws
    flip_slices: bool = setting(False, "the augmentation also mirrors the crops across the slices")
    augment_scale: float = setting(0.2, "largest relative zoom of the augmentation (0.2: content 0.83x to 1.25x "
                                        "its size)", check=FRACTION)
    crop_spacing: tuple[float, float, float] | None = setting(
        DEFAULT_CROP_SPACING, "mm per crop voxel (index, row, col), or None for the scan's native voxels as dlwpt "
                              "(see nodulekit.data.crops); the checkpoint records it for detection")
    # a vessel seen end-on and a nodule look alike in the crop; what continues beyond it differs
    context: float | None = setting(None, "a second input channel: the candidate cut with this many times the crop "
                                          "spacing, the same voxels over that field of view (2.5: 100 x 96 x 96 mm); "
                                          "0 or unset: one channel (dlwpt)", zero_is_none=True)
    val_max_negatives: int | None = setting(2000, "non-nodule candidates sampled for validation (None: all)")
    recall_target: float = setting(0.95, "sensitivity at which the false-positive reduction is reported",
                                   check=SHARE)
    keep: str = setting("best", "the epoch cls.pt holds: best (highest validation AUC) or last",
                        choices=KEEP)
    # the detector's false positives look most like nodules, and random draws rarely show them
    hard_pool: int = setting(1024, "non-nodule training candidates scored before each epoch after the first "
                                   "(0: no hard-negative mining)")
    hard_keep: int = setting(256, "how many of the highest-scoring ones form the hard set")
    hard_share: float = setting(0.25, "share of the negatives drawn from the hard set", check=SHARE)
    # the candidates table's non-nodules come from other rules than the segmentation's proposals,
    # which the classifier has to reject at detection time
    detector_candidates: str | None = setting(
        None, "candidates table of the detector's own findings on the training scans (nodulekit mine, "
              "nodulekit.detect.mine.mine_candidates); its non-nodules become negatives too")
    detector_share: float = setting(0.5, "share of the negatives drawn from detector_candidates", check=SHARE)
    # the easy negatives first: drawn from the start, the classifier learns far more slowly
    detector_from_epoch: int = setting(4, "first epoch (1-based) that draws from detector_candidates",
                                       check=POSITIVE)
    # the detector's false positives the classifier already rejects teach it little
    detector_hard: int = setting(600, "before each epoch that draws detector negatives, score them all and draw "
                                      "only from this many highest-scoring ones (0: from all of them)")
    # scoring costs a 3D forward pass per detector negative, a few thousand of them: on a CPU up to
    # 40 % of the epoch that scores them
    detector_every: int = setting(1, "score the detector negatives before every this many epochs from "
                                     "detector_from_epoch; the epochs in between draw from the last picks",
                                  check=POSITIVE)
    # a few dozen listed nodules show too few small ones on vessels and at the pleura to learn them
    insert_share: float = setting(0.5, "share of the positives that are synthetic nodules inserted at non-nodule "
                                       "candidates (nodulekit.data.insert; 0: listed nodules only)", check=SHARE)
    # the weights of the last steps differ by the batches they last saw, and a running mean of them
    # is the usual remedy for that noise; off by default, as it gained no CPM on the synthetic draws
    ema: float | None = setting(None, "keep an exponential moving average of the weights, with this decay per step "
                                      "(0.99: about the last 100 steps), and validate and save it instead of the "
                                      "weights themselves; 0 or unset: off", check=FRACTION, zero_is_none=True)
    # without normalization the plain convolutions sit at chance for the first epochs at some seeds
    norm: bool = setting(True, "batch norm after every convolution while training; the checkpoints hold it "
                               "merged into the convolutions (dlwpt's layout), except cls_last.pt, which resumes "
                               "the run (off: train plainly as dlwpt, and fine-tune an init checkpoint without "
                               "renormalizing its convolutions)")


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); NaN without both classes."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` from the highest threshold down."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores), kind="stable")
    s, y = np.asarray(scores)[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr = np.r_[0, tps / max(1, y.sum())]
    fpr = np.r_[0, fps / max(1, (~y).sum())]
    return fpr, tpr, np.r_[np.inf, s[last]]


def cls_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5, recall_target: float = 0.95) -> dict:
    """AUC, and precision / recall / F1 at ``threshold``; ``fp_kept`` is the share of non-nodules
    still above the highest threshold that keeps ``recall_target`` of the nodules, and
    ``fp_reduction`` its inverse (how many times fewer false positives the classifier lets through)."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) > threshold
    tp, fp, fn = int((pred & labels).sum()), int((pred & ~labels).sum()), int((~pred & labels).sum())
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    fpr, tpr, thr = roc_curve(labels, probs)
    ok = np.flatnonzero(tpr >= recall_target)
    fp_kept = float(fpr[ok[0]]) if ok.size and labels.any() else float("nan")
    return {
        "auc": auc_score(labels, probs),
        "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "fp_kept": fp_kept, "fp_reduction": ratio(1.0, fp_kept),
        "threshold_at_target": float(thr[ok[0]]) if ok.size else float("nan"),
        "positives": int(labels.sum()), "negatives": int((~labels).sum()),
    }


def save_roc_png(path: Path, labels, probs, title: str = "classifier ROC (held-out candidates)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc_score(labels, probs):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false-positive rate", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fast_scorer(model: torch.nn.Module, device="cpu"):
    """What scores crops fastest for :func:`predict_cls`: on a CPU with OpenVINO installed, the
    model's merged copy compiled by OpenVINO (a callable from a crop batch to nodule
    probabilities); else the model itself.

    Training scores thousands of crops before every epoch (hard negatives, the detector's
    negatives) and at validation; OpenVINO runs the classifier's 3D convolutions about 1.7x faster
    than PyTorch on a CPU, with the same probabilities to float rounding (the export parity tests),
    and compiling costs about a second.
    """
    from nodulekit.deploy.openvino import openvino_available

    if not isinstance(model, LunaModel) or torch.device(device).type != "cpu" or not openvino_available():
        return model
    from nodulekit.deploy.export import export_cls_onnx
    from nodulekit.deploy.openvino import OpenVinoClsRunner, compile_module

    was_training = model.training
    try:
        return compile_module(model.eval().folded(), export_cls_onnx, OpenVinoClsRunner)
    finally:
        model.train(was_training)


def predict_cls(model, ds, batch_size: int = 64, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(labels, nodule probabilities)`` of a classifier over a dataset of ``(crop, label)``;
    ``model`` is a torch module or a callable from a crop batch (numpy) to nodule probabilities
    (:func:`fast_scorer`)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
        # batch norms merged into the convolutions: the same outputs, a quarter less time
        net = model.folded().to(memory_format=CHANNELS_LAST) if getattr(model, "norm", False) else model

        def score(x: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return net(x.to(device).contiguous(memory_format=CHANNELS_LAST))[1][:, 1].float().cpu().numpy()
    else:
        def score(x: torch.Tensor) -> np.ndarray:
            return np.asarray(model(x.numpy()), dtype=np.float32)

    labels, probs = [], []
    for x, y in DataLoader(ds, batch_size=batch_size):
        probs.append(score(x))
        labels.append(np.asarray(y))
    return np.concatenate(labels), np.concatenate(probs)


def mine_hard_negatives(model, train_ds, pool: int, keep: int, seed: int, epoch: int,
                        device="cpu") -> np.ndarray:
    """Indices (into ``train_ds.neg``) of the ``keep`` non-nodules the model scores highest among
    ``pool`` drawn from ``(seed, epoch)`` (the same on every DDP rank)."""
    n = len(train_ds.neg)
    drawn = np.sort(np.random.default_rng((seed, epoch, 7)).choice(n, min(pool, n), replace=False))
    return drawn[highest_scoring(model, [train_ds.neg[i] for i in drawn], train_ds.crops, keep, device,
                                 what="hard negatives")]


def highest_scoring(model, samples, crops, keep: int, device="cpu",
                    what: str = "picked") -> np.ndarray:
    """Indices (into ``samples``) of the ``keep`` non-nodules the model scores highest, highest first;
    ``crops`` is the training set's crop maker (its cache, size and voxel size)."""
    from nodulekit.data.cls_dataset import ClsValDataset

    scored = ClsValDataset(samples, crops.cache, max_negatives=None, crop=crops.crop, crop_spacing=crops.crop_spacing,
                           context=crops.context)
    _, probs = predict_cls(model, scored, device=device)
    order = np.argsort(-probs, kind="stable")[:keep]
    log.info("%s: %d of %d scored non-nodules, nodule probability %.3f-%.3f", what, len(order), len(samples),
             float(probs[order[-1]]) if len(order) else math.nan, float(probs[order[0]]) if len(order) else math.nan)
    return order


def _context(cfg: ClsTrainConfig, init) -> float | None:
    """The run's context channel: the setting's, else the init checkpoint's (its first layer's
    channels fix it); a setting that disagrees with the checkpoint is an error."""
    from nodulekit.data.crops import channel_spacings
    from nodulekit.errors import InputError

    context = cfg.context
    if init is not None:
        if context is not None and context != init.context:
            raise InputError(cfg.init, f"has context {init.context}, the run asks for {context}")
        context = init.context
    try:
        channel_spacings(cfg.crop_spacing, context)
    except ValueError as exc:
        raise InputError("context", str(exc)) from None
    return context


def train_cls(cfg: ClsTrainConfig) -> dict:
    """Train the classifier as ``cfg`` says (also under ``torchrun``).

    Returns:
        ``run_dir``, ``checkpoint`` (the kept epoch), ``best`` (its validation row), ``history``, ``seconds``.
    """
    import os

    from tqdm import tqdm

    from nodulekit.data.cache import VolumeCache
    from nodulekit.data.cls_dataset import build_cls_datasets
    from nodulekit.errors import InputError
    from nodulekit.models.checkpoint import load_cls_model

    if cfg.keep not in KEEP:
        raise ValueError(f"keep must be 'best' or 'last', got {cfg.keep!r}")
    if cfg.ema is not None and not 0 <= cfg.ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {cfg.ema}")
    t_start = time.perf_counter()
    ctx = init_distributed(cfg.device)
    dev = ctx.device
    try:
        if dev.type == "cpu":
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // ctx.world_size))
        out = Path(cfg.out)
        writes = ctx.is_main
        if (out / "cls_last.pt").is_file() and not cfg.resume:
            raise InputError(out, "holds a classifier run already: pass --resume to continue it, or another --out")
        cache = VolumeCache(cfg.cache_dir or Path(cfg.data) / ".cache")
        init = load_cls_model(cfg.init)[0] if cfg.init else None
        context = _context(cfg, init)
        train_ds, val_ds = build_cls_datasets(
            cfg.data, val_fraction=cfg.val_fraction, split_file=cfg.split, seed=cfg.seed, cache=cache,
            samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size * ctx.world_size,
            val_max_negatives=cfg.val_max_negatives, crop_spacing=cfg.crop_spacing,
            detector_candidates=cfg.detector_candidates, insert_share=cfg.insert_share, context=context)

        torch.manual_seed(cfg.seed)
        # Conv3d runs about 2.5x faster on the CPU with channels-last activations
        if cfg.init:
            # the checkpoint's widths and crop (pruned or dlwpt ones too); batch norms (if any) start
            # with unit scale and zero shift on top of its weights, but in training they normalize by
            # batch statistics, so the first steps change what it computes (--no-norm: unchanged)
            model = LunaModel(widths=init.widths, crop=init.crop, norm=cfg.norm, context=context)
            loaded = model.load_state_dict(init.state_dict(), strict=False)
            unmatched = [k for k in loaded.missing_keys if ".bn" not in k] + list(loaded.unexpected_keys)
            if unmatched:
                raise InputError(cfg.init, f"classifier weights do not match LunaModel: {unmatched[:3]}")
        else:
            model = LunaModel(norm=cfg.norm, context=context)
        model = model.to(dev, memory_format=CHANNELS_LAST)
        model.crop_spacing = None if cfg.crop_spacing is None else tuple(float(v) for v in cfg.crop_spacing)
        # the batch norms' running statistics are averaged with the weights
        ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
               if cfg.ema else None)
        kept = model if ema is None else ema.module  # what is validated and saved as cls.pt
        net = wrap_model(model, ctx)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        aug = (RandAffine(flip=True, shift=0.1, scale=cfg.augment_scale, rotate_deg=180.0, noise_hu=25.0,
                          flip_slices=cfg.flip_slices)
               if cfg.augment else None)
        # a context channel spans `context` times the field of view: shifted by as many mm, not voxels
        fov = None if context is None else (1.0, context)
        sampler = (DistributedSampler(train_ds, ctx.world_size, ctx.rank, shuffle=False, drop_last=True)
                   if ctx.distributed else None)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                            drop_last=True)
        steps = len(loader)
        total, warmup = cfg.epochs * steps, max(1, cfg.epochs * steps // 20)
        config = asdict(cfg)

        history, start, best = [], 0, None
        if cfg.resume and (out / "cls_last.pt").is_file():
            ck = read_checkpoint(out / "cls_last.pt")
            model.load_state_dict(ck["model_state"])
            opt.load_state_dict(ck["optimizer_state"])
            if ema is not None:
                if "ema_state" not in ck:
                    raise InputError(out / "cls_last.pt", "holds no weight average to resume with --ema")
                ema.load_state_dict(ck["ema_state"])
            start, history, best = int(ck["epoch"]), list(ck.get("history", [])), ck.get("best_auc")
            _runlog.set_rng_state(ck.get("rng"))
            log.info("resuming %s at epoch %d of %d", out / "cls_last.pt", start + 1, cfg.epochs)
        tb = _runlog.TensorBoard(out if writes else None)

        pick = None  # the detector negatives the last scoring picked (None: none scored yet)
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            threads.follow()  # the scorers below compile for the current thread count
            train_ds.set_epoch(epoch)
            share = cfg.detector_share if epoch + 1 >= cfg.detector_from_epoch else 0.0
            # a resumed run scores at once: its last picks were not saved
            mine_detector = bool(share and cfg.detector_hard > 0 and train_ds.detector_neg) and (
                pick is None or (epoch + 1 - cfg.detector_from_epoch) % cfg.detector_every == 0)
            mine_hard = epoch > 0 and cfg.hard_pool > 0 and cfg.hard_share > 0
            scorer = fast_scorer(model, dev) if mine_detector or mine_hard else None
            if mine_detector:
                pick = highest_scoring(scorer, train_ds.detector_neg, train_ds.crops, cfg.detector_hard, dev,
                                       what="detector negatives")
            train_ds.set_detector_share(share, pick)
            if mine_hard:
                hard = mine_hard_negatives(scorer, train_ds, cfg.hard_pool, cfg.hard_keep, cfg.seed, epoch, dev)
                train_ds.set_hard_negatives(hard, cfg.hard_share)
            del scorer
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009 + ctx.rank)
            model.train()
            loss_sum = 0.0
            for i, (x, y) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                                            disable=not (cfg.progress and ctx.is_main))):
                threads.follow()
                if aug is not None:
                    x = aug(x, generator=gen, channel_fov=fov)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(epoch * steps + i, total, warmup)
                logits, _ = net(x.to(dev).contiguous(memory_format=CHANNELS_LAST))
                loss = F.cross_entropy(logits, y.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update_parameters(model)
                loss_sum += loss.item()
            row = {"epoch": epoch + 1, "loss": mean_across(loss_sum / steps, ctx), "lr": opt.param_groups[0]["lr"],
                   "train_s": time.perf_counter() - t0}
            labels = probs = None
            if ctx.is_main and ((epoch + 1) % max(1, cfg.val_every) == 0 or epoch + 1 == cfg.epochs):
                labels, probs = predict_cls(fast_scorer(kept, dev), val_ds, device=dev)
                row.update(cls_metrics(labels, probs, recall_target=cfg.recall_target))
            row["seconds"] = time.perf_counter() - t0
            row = _runlog.clean_row(row)
            history.append(row)
            if ctx.is_main and labels is None:
                log.info("epoch %d/%d  loss %.4f (%.0f s)", epoch + 1, cfg.epochs, row["loss"], row["seconds"])
            elif ctx.is_main:
                log.info("epoch %d/%d  loss %.4f  AUC %.3f  F1 %.3f  FP cut %.1fx at %.0f%% sensitivity (%.0f s)",
                         epoch + 1, cfg.epochs, row["loss"], row.get("auc", math.nan), row.get("f1", math.nan),
                         row.get("fp_reduction", math.nan), 100 * cfg.recall_target, row["seconds"])
            auc = row.get("auc", math.nan)
            improved = math.isfinite(auc) and (best is None or auc > best)
            if improved:
                best = auc
            if writes:
                meta = {"epoch": epoch + 1, "metrics": row, "config": config}
                if improved or cfg.keep == "last":
                    save_cls_checkpoint(out / "cls.pt", kept.folded(), **meta)
                    if labels is not None:
                        save_roc_png(out / "roc.png", labels, probs)
                save_cls_checkpoint(out / "cls_last.pt", model, **meta, optimizer_state=opt.state_dict(),
                                    history=history, best_auc=best, rng=_runlog.rng_state(),
                                    **({} if ema is None else {"ema_state": ema.state_dict()}))
                _runlog.write_csv(out / "log.csv", history)
                tb.scalars(row, epoch + 1, prefix="cls/")
            barrier(ctx)
        tb.close()
        scored = [r for r in history if math.isfinite(r.get("auc", math.nan))]
        best_row = (history[-1] if history else {}) if cfg.keep == "last" or not scored else \
            max(scored, key=lambda r: r["auc"])
        result = {"run_dir": str(out), "checkpoint": str(out / "cls.pt"), "best": best_row, "history": history,
                  "seconds": time.perf_counter() - t_start}
        if writes:
            (out / "summary.json").write_text(json.dumps(result, indent=2, default=float))
            log.info("kept epoch %s: AUC %.3f -> %s (%.0f s)", best_row.get("epoch"), best_row.get("auc", math.nan),
                     out / "cls.pt", result["seconds"])
        return result
    finally:
        cleanup()
