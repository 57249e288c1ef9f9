"""Compression search: per-block pruning sensitivity, then the U-Net widths that lose least under a
weight-memory budget, compared with uniform pruning at the same budget.

1. **Sensitivity.** Each U-Net block (``down_path.i``, ``up_path.i``) is pruned alone to a few widths
   (multiples of 8, as the NPU compiler wants), fine-tuned briefly, and scored by a cheap proxy:
   pixel average precision on validation slices (a variant that marks more pixels cannot buy it,
   unlike recall at a fixed threshold; see :func:`proxy`).
2. **Choice.** Every combination of the probed widths is priced by its weight memory
   (:func:`npu_weight_kib`, or any ``memory`` function) and by its predicted loss, the sum of its
   blocks' losses; the least loss within the budget wins. Summing assumes the blocks' losses add up,
   which holds roughly for small cuts and is why the winner is then trained and measured for real.
3. **Build.** The winner and the uniform cut that fits the same budget each go through the study
   (:func:`nodulekit.optimize.study.run_study`: prune, fine-tune, PTQ, QAT, export, measure), so
   both are judged by the same deployed files; ``nodulekit score`` then gives their end-to-end CPM.

Torch-Pruning prunes (:mod:`nodulekit.optimize.prune`): it removes whole channels along the U-Net's
dependency graph, skip concatenations included, and leaves a plain smaller ``SegModel`` that every
exporter, the RKNN compiler included, takes as it is. NNCF's pruning works on its own wrapped graph
and targets OpenVINO; the widths chosen here must suit the NPU, so the search stays on torch.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from nodulekit.log import get_logger
from nodulekit.models.unet import SegModel, UNetWidths
from nodulekit.train.config import POSITIVE, setting

log = get_logger("optimize")

ALIGN = 8  # channel multiple of every searched width


@dataclass
class SearchConfig:
    """Settings of the search itself; the fine-tuning, quantization and measurement of the two
    winners are the study's (:class:`nodulekit.optimize.study.StudyConfig`)."""

    # the 8x target: the fp16 baseline's 236.81 KiB of NPU weight memory / 8
    budget_kib: float = setting(29.6, "weight-memory budget of the int8 NPU build in KiB (estimated by "
                                      "nodulekit.optimize.search.npu_weight_kib)", check=POSITIVE)
    fractions: tuple[float, ...] = setting((0.125, 0.25, 0.5, 0.75), "widths probed per U-Net block, as shares of its "
                                                              "full width (rounded to multiples of 8)")
    probe_steps: int = setting(96, "fine-tuning steps after each probe's cut", check=POSITIVE)
    probe_val_slices: int = setting(48, "validation slices of the proxy, nodule slices first", check=POSITIVE)
    uniform: bool = setting(True, "also build the uniform cut at the same budget, for comparison")
    # the CPU budget: a slice's convolutions dominate its latency, so MACs rank widths as latency
    # does; the studies then time the real files
    min_speedup: float | None = setting(None, "also keep the multiply-accumulates of a 512x512 slice at most "
                                              "the baseline's / this (a CPU latency budget; 0: none)",
                                        check=POSITIVE, zero_is_none=True)


def blocks(widths: UNetWidths) -> dict[str, int]:
    """Full output width of each prunable U-Net block, by the name ``prune_seg`` takes."""
    out = {f"down_path.{i}": int(w[0]) for i, w in enumerate(widths.down)}
    out.update({f"up_path.{i}": int(w[0]) for i, w in enumerate(widths.up)})
    return out


def probe_widths(full: int, fractions) -> list[int]:
    """The narrower widths probed for a block of ``full`` channels: each fraction rounded to a
    multiple of :data:`ALIGN` (at least one multiple), below ``full``, without repeats."""
    found = {max(ALIGN, ALIGN * round(full * f / ALIGN)) for f in fractions}
    return sorted(w for w in found if w < full)


def widths_for(base: UNetWidths, choice: dict[str, int]) -> UNetWidths:
    """``base`` with each named block's convs set to the chosen width."""
    down = tuple((choice.get(f"down_path.{i}", w[0]),) * len(w) for i, w in enumerate(base.down))
    up = tuple((choice.get(f"up_path.{i}", w[0]),) * len(w) for i, w in enumerate(base.up))
    return replace(base, down=down, up=up)


def ratio_spec(full: dict[str, int], choice: dict[str, int]) -> str:
    """The ``prune_seg`` ratio spec that cuts each block from its full width to the chosen one."""
    parts = [f"{name}={1 - choice[name] / full[name]:.6g}" for name in full if choice.get(name, full[name]) < full[name]]
    return ",".join(parts) or "0"


@functools.lru_cache(maxsize=4096)
def _conv_shapes(widths: UNetWidths) -> tuple[tuple[int, int, int], ...]:
    """``(out, in, kernel elements)`` of every conv of a U-Net of these widths (built on the meta
    device: shapes only, no memory, so that a search can price thousands of combinations)."""
    with torch.device("meta"):
        model = SegModel(widths)
    return tuple((m.out_channels, m.in_channels, m.kernel_size[0] * m.kernel_size[1]) for m in model.modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))


# rknn-toolkit2's int8 RK3588 build of this U-Net at 1x7x512x512 (scripts/npu_memory_fit.py): each
# conv's weights take one byte per weight with its input channels packed to multiples of 16, plus a
# few KiB that do not depend on the widths (biases, quantization parameters, the graph's constants)
NPU_ALIGN_IN = 16
NPU_OVERHEAD_KIB = 9.6


def npu_weight_kib(widths: UNetWidths, *, bytes_per_weight: int = 1, align_out: int = 1,
                   align_in: int = NPU_ALIGN_IN, bias_bytes: int = 0, overhead_kib: float = NPU_OVERHEAD_KIB) -> float:
    """Estimated weight memory of an int8 NPU build: every conv's weights at ``bytes_per_weight``,
    with output and input channels rounded up to ``align_out`` and ``align_in`` (the compiler's
    channel packing), a ``bias_bytes`` bias per output channel, and ``overhead_kib``.

    The defaults follow the RK3588 compiler's builds; a width that is not a multiple of 16 costs
    as much input-side memory as the next multiple, which is why narrow layers save less than
    their parameter count suggests. The search checks its winners with real builds when
    ``.venv-rknn`` exists (the study's ``--rknn``)."""
    def up(n: int, a: int) -> int:
        return -(-n // a) * a

    total = sum(up(o, align_out) * (up(i, align_in) * k * bytes_per_weight + bias_bytes)
                for o, i, k in _conv_shapes(widths))
    return total / 1024.0 + overhead_kib


@functools.lru_cache(maxsize=4096)
def slice_macs(widths: UNetWidths, size: int = 512) -> int:
    """Multiply-accumulates of the convolutions for one ``size`` x ``size`` slice (shapes traced on
    the meta device)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input pixel spreads over the kernel
            total += inputs[0].numel() * module.out_channels * kernel // module.groups
        else:
            total += output.numel() * module.in_channels * kernel // module.groups

    with torch.device("meta"):
        model = SegModel(widths).eval()
        hooks = [m.register_forward_hook(count) for m in model.modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        with torch.no_grad():
            model(torch.empty(1, widths.in_channels, size, size))
    for h in hooks:
        h.remove()
    return int(total)


def _fits(widths: UNetWidths, memory, budget_kib: float, max_macs: int | None) -> float | None:
    """``memory(widths)`` when it fits the budget (and ``max_macs``), else None."""
    kib = memory(widths)
    if kib > budget_kib or (max_macs is not None and slice_macs(widths) > max_macs):
        return None
    return kib


def choose(full: dict[str, int], loss: dict[str, dict[int, float]], memory, budget_kib: float,
           base: UNetWidths, max_macs: int | None = None) -> dict | None:
    """The combination of probed widths with the least summed loss whose ``memory(widths)`` fits
    ``budget_kib`` (and whose :func:`slice_macs` fit ``max_macs``; ties: the larger memory); None
    when none fits.

    ``loss[block][width]`` is the proxy loss of that block alone at that width (0 at full width).
    """
    options = [[(full[b], 0.0), *sorted(loss.get(b, {}).items())] for b in full]
    best = None
    for combo in itertools.product(*options):
        choice = {b: w for b, (w, _) in zip(full, combo)}
        kib = _fits(widths_for(base, choice), memory, budget_kib, max_macs)
        if kib is None:
            continue
        predicted = sum(v for _, v in combo)
        key = (predicted, -kib)
        if best is None or key < best["key"]:
            best = {"key": key, "choice": choice, "predicted_loss": predicted, "memory_kib": kib}
    if best is not None:
        best.pop("key")
        best["macs"] = slice_macs(widths_for(base, best["choice"]))
    return best


def uniform_at_budget(full: dict[str, int], memory, budget_kib: float, base: UNetWidths,
                      max_macs: int | None = None) -> dict | None:
    """The uniform cut (every block kept at the same share, rounded to multiples of :data:`ALIGN`)
    with the most memory that fits ``budget_kib`` (and ``max_macs``); None when even the narrowest
    does not."""
    best = None
    for keep in range(100, 0, -1):
        choice = {b: max(ALIGN, ALIGN * round(w * keep / 100 / ALIGN)) for b, w in full.items()}
        kib = _fits(widths_for(base, choice), memory, budget_kib, max_macs)
        if kib is not None and (best is None or kib > best["memory_kib"]):
            best = {"choice": choice, "keep": keep / 100, "memory_kib": kib}
    if best is not None:
        best["macs"] = slice_macs(widths_for(base, best["choice"]))
    return best


def proxy(model: torch.nn.Module, val_ds, base_precision: float | None = None) -> dict:
    """The proxy of a float model on ``val_ds``: pixel average precision (``ap``, the loss is
    counted on it), with recall at ``base_precision`` (default: its own precision at 0.5), and
    recall, precision and Dice at 0.5.

    Average precision, not recall at the baseline's precision: a cut fine-tuned for only a few
    steps rarely reaches the baseline's precision at any threshold, which leaves that recall at
    zero for every probe and the choice blind."""
    from nodulekit.evaluate.seg_metrics import average_precision, evaluate_seg, recall_at_precision
    from nodulekit.optimize.study import PR_BINS
    from nodulekit.train.seg import torch_predictor

    model.eval()
    metrics = evaluate_seg(torch_predictor(model, torch.device("cpu")), val_ds, pr_bins=PR_BINS)
    target = metrics["precision"] if base_precision is None else base_precision
    matched = recall_at_precision(metrics["pr_hist"], target)["recall"]
    return {"ap": average_precision(metrics["pr_hist"]),
            "matched_recall": 0.0 if math.isnan(matched) else float(matched), "recall": float(metrics["recall"]),
            "precision": float(metrics["precision"]), "dice": float(metrics["dice"])}


class _Prober:
    """Prune the baseline by a ratio spec, fine-tune ``cfg.probe_steps`` steps, and score the proxy
    on ``cfg.probe_val_slices`` validation slices (the same slices and steps for every probe)."""

    def __init__(self, baseline: SegModel, ctx, cfg: SearchConfig):
        from nodulekit.data.seg_dataset import SliceSubset, pick_slices

        self.baseline, self.ctx, self.cfg = baseline, ctx, cfg
        self.val = SliceSubset(ctx.val_ds, pick_slices(ctx.val_ds, cfg.probe_val_slices))
        self.base = proxy(baseline, self.val)

    def __call__(self, spec) -> dict:
        from nodulekit.optimize.prune import prune_seg
        from nodulekit.optimize.study import _fit

        study, train_ds = self.ctx.cfg, self.ctx.train_ds
        per_epoch = train_ds.samples_per_epoch
        train_ds.samples_per_epoch = self.cfg.probe_steps * study.batch_size
        try:
            torch.manual_seed(study.seed)
            model = prune_seg(self.baseline, spec)
            _fit(model, self.ctx, validate=False, epochs=1, lr=study.finetune_lr, fn_weight=study.fn_weight,
                 channels_last=True)
        finally:
            train_ds.samples_per_epoch = per_epoch
        model.to(memory_format=torch.contiguous_format)
        figures = proxy(model, self.val, self.base["precision"])
        figures["loss"] = self.base["ap"] - figures["ap"]
        figures["widths"] = {b: w for b, w in blocks(model.current_widths()).items()}
        return figures


def sensitivity(prober: _Prober) -> dict:
    """Each block pruned alone to each probed width, through ``prober``.

    Returns:
        ``{"baseline": proxy figures, "blocks": {block: {width: proxy figures + "loss"}}}``.
    """
    from tqdm import tqdm

    full = blocks(prober.baseline.current_widths())
    probes = [(b, w) for b, f in full.items() for w in probe_widths(f, prober.cfg.fractions)]
    out: dict[str, dict[int, dict]] = {b: {} for b in full}
    for block, width in tqdm(probes, desc="sensitivity", disable=not prober.ctx.cfg.progress):
        figures = prober({block: 1 - width / full[block]})
        figures.pop("widths")
        out[block][width] = figures
        log.info("%s at %d of %d channels: pixel AP %.3f (loss %+.3f), recall at the baseline's precision %.3f",
                 block, width, full[block], figures["ap"], figures["loss"], figures["matched_recall"])
    return {"baseline": prober.base, "blocks": out, "val_slices": len(prober.val),
            "probe_steps": prober.cfg.probe_steps}


def run_search(seg_ckpt, data_dir, out_dir, study_cfg=None, cfg: SearchConfig | None = None, *, memory=None,
               datasets=None) -> dict:
    """Search the widths under ``cfg.budget_kib``, then build and measure the winner (and the
    uniform cut at the same budget) as studies under ``<out_dir>/searched`` and ``<out_dir>/uniform``.

    Args:
        seg_ckpt: the trained baseline checkpoint (or a :class:`SegModel`).
        data_dir: LUNA16-layout dataset (training crops and validation slices).
        out_dir: search folder: ``search.json``, and one study folder per built cut.
        study_cfg: the studies' settings (:class:`StudyConfig`); their variants are baseline,
            pruned, pruned_ptq and pruned_qat unless it names others.
        cfg: the search's settings.
        memory: ``UNetWidths -> KiB`` the budget is checked with (default :func:`npu_weight_kib`).
        datasets: ``(train_ds, val_ds)`` already built.

    Returns:
        ``search.json``'s content.
    """
    from nodulekit.io import write_json
    from nodulekit.models.checkpoint import load_seg_model
    from nodulekit.optimize.study import StudyConfig, StudyContext, run_study
    from nodulekit.report.render import render_report

    cfg = cfg or SearchConfig()
    study_cfg = study_cfg or StudyConfig()
    if study_cfg.variants is None:
        study_cfg = replace(study_cfg, variants=("baseline", "pruned", "pruned_ptq", "pruned_qat"))
    memory = memory or npu_weight_kib
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if datasets is None:
        from nodulekit.data.seg_dataset import build_seg_datasets

        datasets = build_seg_datasets(data_dir, val_fraction=study_cfg.val_fraction, split_file=study_cfg.split,
                                      samples_per_epoch=study_cfg.samples_per_epoch, crop=study_cfg.crop,
                                      seed=study_cfg.seed, progress=study_cfg.progress)
    baseline = seg_ckpt.eval() if isinstance(seg_ckpt, torch.nn.Module) else load_seg_model(seg_ckpt)[0]
    base_widths = baseline.current_widths()
    full = blocks(base_widths)
    ctx = StudyContext(study_cfg, *datasets, {}, baseline)
    if study_cfg.threads:
        torch.set_num_threads(study_cfg.threads)
    prober = _Prober(baseline, ctx, cfg)
    sens = sensitivity(prober)
    losses = {b: {w: f["loss"] for w, f in per.items()} for b, per in sens["blocks"].items()}
    base_macs = slice_macs(base_widths)
    max_macs = int(base_macs / cfg.min_speedup) if cfg.min_speedup else None
    picks = {"searched": choose(full, losses, memory, cfg.budget_kib, base_widths, max_macs)}
    if cfg.uniform:
        picks["uniform"] = uniform_at_budget(full, memory, cfg.budget_kib, base_widths, max_macs)
    for pick in picks.values():
        if pick is not None:
            pick["macs_speedup"] = round(base_macs / pick["macs"], 2)
            # the proxy of the whole cut, to check that the proxy ranks cuts as end-to-end CPM does
            pick["proxy"] = prober(ratio_spec(full, pick["choice"]))
    # the study's own ratio (the demo's pruned variants), the reference the search should beat
    ref = prober(study_cfg.prune_ratio)
    ref_widths = widths_for(base_widths, ref["widths"])
    picks["reference"] = {"prune_ratio": study_cfg.prune_ratio, "choice": ref["widths"], "proxy": ref,
                          "memory_kib": memory(ref_widths), "macs_speedup": round(base_macs / slice_macs(ref_widths), 2)}
    doc = {"budget_kib": cfg.budget_kib, "max_macs": max_macs, "settings": asdict(cfg), "full_widths": full,
           "baseline_memory_kib": memory(base_widths), "baseline_macs": base_macs, "sensitivity": sens,
           "picks": {}, "studies": {}}
    seconds = {"sensitivity": round(time.perf_counter() - t0, 1)}
    doc["picks"]["reference"] = {**picks.pop("reference"), "built": False}
    for name, pick in picks.items():
        if pick is None:
            log.warning("no %s cut fits %.2f KiB", name, cfg.budget_kib)
            doc["picks"][name] = None
            continue
        spec = ratio_spec(full, pick["choice"])
        doc["picks"][name] = {**pick, "prune_ratio": spec}
        log.info("%s: widths %s (%.2f KiB estimated), ratio %s", name, pick["choice"], pick["memory_kib"], spec)
        t1 = time.perf_counter()
        study = run_study(baseline, data_dir, out_dir / name, replace(study_cfg, prune_ratio=spec), datasets=datasets)
        seconds[name] = round(time.perf_counter() - t1, 1)
        doc["studies"][name] = {"dir": name, "rows": [_row_summary(r) for r in study["variants"]],
                                "npu": [_row_summary(r) for r in study.get("npu") or []]}
        render_report(out_dir / name)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    doc["timings_s"] = seconds
    write_json(out_dir / "search.json", doc)
    return json.loads(json.dumps(doc, default=float))


def _row_summary(row: dict) -> dict:
    keys = ("name", "error", "widths", "weight_memory_kib", "weight_memory_ratio", "size_kib", "latency_us",
            "latency_ratio", "recall", "precision", "dice", "recall_at_baseline_precision", "artifact")
    return {k: row[k] for k in keys if k in row}
