"""The compression study: build every variant from the stage table, export, measure, report.

``run_study`` reads top to bottom: data, baseline, variants (stage by stage, prefixes cached),
exports, the measurement of the deployed artifacts (weight memory, size, accuracy with ONNX
Runtime; then, after the caller's ``before_timing``, interleaved latency and ratios against the
baseline), then ``report.json``. Rendering it is
the caller's step (:func:`nodulekit.report.render.render_report`), so that this layer does not
depend on the report's. A variant that fails becomes a row with an ``error``.
"""

from __future__ import annotations

import copy
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nodulekit import SEG_CHANNELS
from nodulekit.log import get_logger
from nodulekit.optimize import variants as V
from nodulekit.train.config import POSITIVE, RunConfig, setting
from nodulekit.train.seg import SegTrainConfig

log = get_logger("optimize")

PR_BINS = 200  # probability bins of the precision-recall histograms (thresholds 0.005 apart)


@dataclass
class StudyConfig(RunConfig):
    """Settings of a compression study (``None`` means "not set"); the shared ones are
    :class:`nodulekit.train.config.RunConfig`'s and apply to the fine-tuning and QAT."""

    # latencies are compared at one fixed thread count, whatever the machine's cores
    threads: int | None = 2
    variants: tuple[str, ...] | None = setting(None, "variants to build (default: every entry of the variants "
                                                     "table; the baseline is always included)")
    # widths 8/16/24: multiples of 8, as the NPU wants
    prune_ratio: str = setting("0.5,down_path.2=0.625", "channel ratio: '0.5' or per block "
                                                        "'down_path.0=0.3,up_path.1=0.6' (nodulekit.optimize.prune)")
    finetune_epochs: int = setting(5, "fine-tuning epochs of the pruned model")
    # half the channels gone, the pruned model relearns most of its function: training's rate
    finetune_lr: float = setting(SegTrainConfig.lr, "peak learning rate of the pruned model's fine-tuning",
                                 check=POSITIVE)
    # recovering from the cut takes far more steps than QAT's adjustment of a trained model
    finetune_samples_per_epoch: int | None = setting(None, "training crops per fine-tuning epoch of the pruned "
                                                           "model (default: samples_per_epoch)", check=POSITIVE)
    fn_weight: float = setting(SegTrainConfig.fn_weight, "false-negative weight of the fine-tuning loss")
    # the cap sets where a compressed model settles between marking the inside of big nodules and
    # marking nothing else: a larger one than training's keeps more of the baseline's recall
    dice_area_cap: float | None = setting(256.0, "area cap of the pooled Dice while fine-tuning and in QAT (0: "
                                                 "none; see nodulekit.train.losses)", zero_is_none=True)
    qat_epochs: int = setting(5, "quantization-aware training epochs")
    # the fake-quant graph is slow: validating on every slice each epoch would cost more than the
    # training; the exported file is measured on every slice afterwards
    qat_val_every: int = setting(1, "validate the fake-quant graph every N QAT epochs and after the last, keeping "
                                    "the best epoch by recall (0: export the last epoch)")
    qat_val_slices: int | None = setting(16, "validation slices for picking the QAT epoch, nodule slices first "
                                             "(0: all)", zero_is_none=True)
    qat_lr: float = setting(1e-4, "peak learning rate of QAT", check=POSITIVE)
    # the baseline's own: a larger one pulls the quantized model towards marking more than the
    # baseline does (nodulekit.train.losses)
    fn_weight_qat: float = setting(SegTrainConfig.fn_weight, "false-negative weight during QAT")
    calib_slices: int = setting(64, "calibration slices of post-training quantization", check=POSITIVE)
    calib_method: str = setting("percentile", "activation range calibration of post-training quantization")
    samples_per_epoch: int = setting(1024, "training crops per fine-tuning and QAT epoch", check=POSITIVE)
    crop: int = setting(SegTrainConfig.crop, "training crop side", check=POSITIVE)
    bench_runs: int = setting(20, "timed runs per deployed file", check=POSITIVE)
    bench_warmup: int = setting(3, "untimed runs before them")
    bench_size: int = setting(512, "slice side of the latency input", check=POSITIVE)
    torchscript: bool = setting(True, "also export TorchScript files")
    rknn: bool = setting(False, "also build RKNN models (needs .venv-rknn)")
    openvino: bool = setting(True, "also measure the float variants in OpenVINO, fp32 and NNCF int8 (CPU table)")


@dataclass
class Build:
    """A model on its way through the stages, and how it will be deployed (the format and export
    arguments of :func:`nodulekit.deploy.export.export`)."""

    model: torch.nn.Module
    fmt: str = "onnx"
    export_kwargs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    float_model: torch.nn.Module | None = None  # the SegModel behind a QAT graph


@dataclass
class StudyContext:
    cfg: StudyConfig
    train_ds: object
    val_ds: object
    timings: dict = field(default_factory=dict)
    baseline: torch.nn.Module | None = None
    baseline_recall: float | None = None  # set by the first fine-tuning (see _baseline_recall)


# ---------------------------------------------------------------------------------------------
# stages: each takes a build and returns one


def stage_prune(cand: Build, ctx: StudyContext) -> Build:
    from nodulekit.optimize.prune import layer_widths, prune_seg

    model = prune_seg(cand.model, ctx.cfg.prune_ratio)
    meta = {**cand.meta, "prune_ratio": str(ctx.cfg.prune_ratio),
            "widths_before": layer_widths(cand.model), "widths_after": layer_widths(model)}
    return Build(model, "onnx", {}, meta)


def stage_finetune(cand: Build, ctx: StudyContext) -> Build:
    """Fine-tune a pruned model; its epoch is picked by nodule recall, then pixel recall up to the
    baseline's, then Dice (:func:`nodulekit.train.seg.recall_key`)."""
    from nodulekit.train.seg import recall_key

    cfg = ctx.cfg
    if cfg.finetune_epochs <= 0:
        return cand
    target = _baseline_recall(ctx)
    per_epoch = ctx.train_ds.samples_per_epoch
    ctx.train_ds.samples_per_epoch = cfg.finetune_samples_per_epoch or per_epoch
    try:
        history = _fit(cand.model, ctx, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, fn_weight=cfg.fn_weight,
                       channels_last=True, rank=lambda row: recall_key(row, target))
    finally:
        ctx.train_ds.samples_per_epoch = per_epoch
    cand.model.to(memory_format=torch.contiguous_format)  # the exporters trace contiguous weights
    return Build(cand.model, cand.fmt, cand.export_kwargs,
                     {**cand.meta, "finetune_history": history, "finetune_recall_target": target})


def _baseline_recall(ctx: StudyContext) -> float | None:
    """Pixel recall of the float baseline on the validation slices (PyTorch), computed once: the
    recall a fine-tuned pruned model has to keep."""
    from nodulekit.evaluate.seg_metrics import evaluate_seg
    from nodulekit.train.seg import fast_predictor

    if ctx.baseline is None or ctx.val_ds is None or not len(ctx.val_ds):
        return None
    if ctx.baseline_recall is None:
        ctx.baseline.eval()
        ctx.baseline_recall = float(evaluate_seg(fast_predictor(ctx.baseline), ctx.val_ds)["recall"])
        log.info("baseline pixel recall on the validation slices: %.3f", ctx.baseline_recall)
    return ctx.baseline_recall


def stage_ptq(cand: Build, ctx: StudyContext) -> Build:
    from nodulekit.deploy.ptq import SliceReader, calibration_items

    scans = ctx.train_ds.scans
    items = calibration_items(scans, ctx.cfg.calib_slices, seed=ctx.cfg.seed)
    kwargs = {"calibration": SliceReader(items, scans), "method": ctx.cfg.calib_method}
    meta = {**cand.meta, "calibration": {"method": ctx.cfg.calib_method, "slices": len(items),
                                         "nodule_slices": sum(z in scans[s].label_slices for s, z in items)}}
    return Build(cand.model, "onnx-int8", kwargs, meta)


def stage_qat(cand: Build, ctx: StudyContext) -> Build:
    from nodulekit.optimize import quantize as Q

    cfg = ctx.cfg
    float_model = cand.model
    prepared = Q.qat_prepare(float_model, 2 ** (float_model.widths.depth - 1), cfg.crop)
    history = _fit(prepared, ctx, epochs=cfg.qat_epochs, lr=cfg.qat_lr, fn_weight=cfg.fn_weight_qat,
                   set_train_mode=Q.set_train_mode, set_eval_mode=Q.set_eval_mode,
                   val_every=max(1, cfg.qat_val_every), validate=cfg.qat_val_every > 0,
                   val_slices=cfg.qat_val_slices)
    Q.set_eval_mode(prepared)
    tuned = copy.deepcopy(float_model)
    own = tuned.state_dict()
    tuned.load_state_dict({k: v for k, v in prepared.state_dict().items() if k in own}, strict=False)
    meta = {**cand.meta, "qat_history": history, "qat": {"epochs": cfg.qat_epochs, "lr": cfg.qat_lr,
                                                          "fn_weight": cfg.fn_weight_qat}}
    return Build(prepared, "onnx-int8", {"convert": True}, meta, float_model=tuned.eval())


STAGE_FUNCS = {"prune": stage_prune, "finetune": stage_finetune, "ptq": stage_ptq, "qat": stage_qat}


def _fit(model, ctx: StudyContext, validate: bool = True, val_slices: int | None = None, **kwargs) -> list[dict]:
    from nodulekit.data.seg_dataset import SliceSubset, pick_slices
    from nodulekit.train.seg import fit_seg, recall_key

    cfg = ctx.cfg
    kwargs.setdefault("val_every", cfg.val_every)
    val_ds = ctx.val_ds if validate else None
    if val_ds is not None and val_slices:
        val_ds = SliceSubset(val_ds, pick_slices(val_ds, val_slices))
    # a compressed model is judged by how much recall it keeps: pick its epoch by recall
    kwargs.setdefault("rank", recall_key)
    return fit_seg(model, ctx.train_ds, val_ds, batch_size=cfg.batch_size, dice_area_cap=cfg.dice_area_cap,
                   workers=cfg.workers, seed=cfg.seed, progress=cfg.progress, **kwargs)


def build_variants(baseline: torch.nn.Module, names, ctx: StudyContext) -> dict[str, Build | Exception]:
    """Run the stages of each variant; a stage prefix shared by several variants runs once."""
    cache: dict[tuple, Build] = {(): Build(baseline)}
    built: dict[str, Build | Exception] = {}
    for name in names:
        stages = V.VARIANTS[name]
        try:
            done = max((k for k in cache if stages[:len(k)] == k), key=len)
            cand = cache[done]
            for i in range(len(done), len(stages)):
                t0 = time.perf_counter()
                cand = STAGE_FUNCS[stages[i]](_copy(cand), ctx)
                ctx.timings["+".join(stages[:i + 1])] = round(time.perf_counter() - t0, 2)
                cache[stages[:i + 1]] = cand
            built[name] = cand
        except Exception as exc:  # one failed variant becomes an error row
            log.exception("variant %s failed", name)
            built[name] = exc
    return built


def _copy(cand: Build) -> Build:
    return Build(copy.deepcopy(cand.model), cand.fmt, dict(cand.export_kwargs), dict(cand.meta),
                     cand.float_model)


# ---------------------------------------------------------------------------------------------
# export and measurement


def export_variant(name: str, cand: Build, out_dir: Path, cfg: StudyConfig) -> dict:
    """Write ``out_dir/<name>/``: the deployed ONNX, TorchScript of float models, the checkpoint."""
    from nodulekit.deploy.export import export
    from nodulekit.models.checkpoint import save_seg_checkpoint
    from nodulekit.optimize import quantize as Q

    vdir = out_dir / name
    vdir.mkdir(parents=True, exist_ok=True)
    float_model = cand.float_model or cand.model
    ckpt = save_seg_checkpoint(vdir / "seg.pt", float_model, variant=name, stages=list(V.VARIANTS[name]),
                               config=asdict(cfg), pruning={k: cand.meta[k] for k in ("prune_ratio",)
                                                            if k in cand.meta})
    model = Q.qat_convert(cand.model) if cand.export_kwargs.get("convert") else cand.model
    kwargs = {k: v for k, v in cand.export_kwargs.items() if k != "convert"}
    art = export(model, cand.fmt, vdir, variant=name, **kwargs)
    files = {"deployed": art.to_dict(), "checkpoint": str(ckpt)}
    if cfg.torchscript and cand.fmt == "onnx":
        files["torchscript"] = export(cand.model, "torchscript", vdir, variant=name).to_dict()
    return files


def npu_section(rows: list[dict], out_dir: Path, train_ds, val_ds, cfg: StudyConfig) -> list[dict]:
    """``report.json["npu"]``: each variant built for the RK3588 NPU by :mod:`nodulekit.deploy.rknn`:
    float variants in fp16, PTQ variants quantized by the toolkit from the float ONNX of their source
    (same calibration slices as ORT), QAT variants from their QDQ file with its learnt ranges."""
    from nodulekit.deploy.measure import npu_rows
    from nodulekit.deploy.ptq import calibration_items

    by_name = {r["name"]: r for r in rows if "error" not in r}
    triples = []
    for name, r in by_name.items():
        stages = V.VARIANTS[name]
        if "qat" in stages:
            triples.append((name, Path(r["artifact"]), "qat"))
        elif "ptq" in stages:
            source = "pruned" if "prune" in stages else V.BASELINE
            if source in by_name:
                triples.append((name, Path(by_name[source]["artifact"]), "ptq"))
        else:
            triples.append((name, Path(r["artifact"]), "fp16"))
    scans = train_ds.scans
    calibration = [scans[s].context(z)[None] for s, z in calibration_items(scans, cfg.calib_slices, seed=cfg.seed)]
    rows = npu_rows(triples, out_dir / "npu", calibration=calibration, val_ds=val_ds)
    for row in rows:
        row["artifact"] = os.path.relpath(row["artifact"], out_dir)
    return rows


# the CPU table: the float variants in each CPU runtime, timed in one interleaved run
CPU_SOURCES = (V.BASELINE, "pruned")
CPU_BASELINE = f"{V.BASELINE} onnxruntime fp32"


def cpu_rows(rows: list[dict], out_dir: Path, train_ds, val_ds, cfg: StudyConfig) -> list[dict]:
    """``report.json["cpu"]`` before its timing: the float variants (baseline, pruned) as ONNX
    Runtime fp32, OpenVINO fp32 and OpenVINO int8 (NNCF on the ONNX Runtime PTQ's calibration
    slices), exported and evaluated; :func:`cpu_latency` times them. The int8 rows of the main table
    are ONNX Runtime QDQ graphs; OpenVINO's int8 is the CPU runtime's own."""
    from nodulekit.deploy.export import export_openvino, export_openvino_int8
    from nodulekit.deploy.measure import fill_quality
    from nodulekit.deploy.onnx_utils import weight_memory_bytes
    from nodulekit.deploy.ptq import SliceReader, calibration_items
    from nodulekit.deploy.rows import new_row
    from nodulekit.deploy.runtime import load_runner
    from nodulekit.evaluate.seg_metrics import evaluate_seg

    by_name = {r["name"]: r for r in rows if "error" not in r and r.get("artifact")}
    scans = train_ds.scans
    calibration = SliceReader(calibration_items(scans, cfg.calib_slices, seed=cfg.seed), scans)
    out: list[dict] = []
    for name in (n for n in CPU_SOURCES if n in by_name):
        src = by_name[name]
        onnx_path = Path(src["artifact"])
        out.append(new_row(f"{name} onnxruntime fp32", "seg", "onnx", "fp32", str(onnx_path), variant=name,
                           runtime="onnxruntime", **{k: src.get(k) for k in ("recall", "precision", "dice",
                                                                            "nodule_recall")}))
        for fmt, quant, exporter, kwargs in (
                ("openvino", "fp32", export_openvino, {}),
                ("openvino-int8", "int8-nncf", export_openvino_int8, {"calibration": calibration})):
            target = out_dir / "cpu" / name / ("model.xml" if fmt == "openvino" else "model.int8.xml")
            row = new_row(f"{name} openvino {'fp32' if fmt == 'openvino' else 'int8'}", "seg", fmt, quant,
                          str(target), variant=name, runtime="openvino")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                exporter(None, target, onnx_path=onnx_path, **kwargs)
            except Exception as exc:  # one runtime failing must not cost the others their rows
                log.exception("OpenVINO export of %s failed", name)
                row["error"] = f"{type(exc).__name__}: {exc}"
            out.append(row)

    def quality(row: dict) -> dict:
        if row["runtime"] == "onnxruntime":  # the main table's figures for the same file
            return {}
        runner = load_runner(row["artifact"], "seg", "openvino", threads=cfg.threads)
        metrics = evaluate_seg(runner, val_ds)
        return {k: metrics[k] for k in ("recall", "precision", "dice", "nodule_recall") if k in metrics}

    def weight_memory(row: dict) -> float:
        path = Path(row["artifact"])
        if path.suffix == ".xml":  # an IR keeps its weights, int8 or fp32, in the .bin beside it
            return path.with_suffix(".bin").stat().st_size / 1024
        return weight_memory_bytes(path) / 1024

    fill_quality(out, quality=quality, weight_memory=weight_memory)
    for row in out:
        path = Path(row["artifact"])
        if "error" not in row and path.suffix == ".xml":  # the deployed IR is both files
            row["size_kib"] = (path.stat().st_size + path.with_suffix(".bin").stat().st_size) / 1024
    return out


def cpu_latency(rows: list[dict], cfg: StudyConfig) -> None:
    """Time :func:`cpu_rows`' rows in one interleaved run and compare each with ONNX Runtime's
    fp32 baseline, in place."""
    from nodulekit.deploy.measure import fill_latency
    from nodulekit.deploy.rows import add_ratios

    size = cfg.bench_size
    fill_latency(rows, shape=(1, SEG_CHANNELS, size, size), runs=cfg.bench_runs, warmup=cfg.bench_warmup,
                 threads=cfg.threads)
    add_ratios(rows, CPU_BASELINE)


def _hist(model: torch.nn.Module, bins: int = 40) -> dict:
    out = {}
    for lname, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            w = m.weight.detach().float().numpy().ravel()
            counts, edges = np.histogram(w, bins=bins)
            out[lname] = {"counts": counts.tolist(), "edges": [round(float(e), 6) for e in edges]}
    return out


def evaluate_rows(rows: list[dict], val_ds, cfg: StudyConfig, timings: dict) -> None:
    """Fill size, weight memory and accuracy (ONNX Runtime on the deployed file) in place
    (:func:`nodulekit.deploy.measure.fill_quality`)."""
    from nodulekit.deploy.measure import fill_quality
    from nodulekit.deploy.onnx_utils import param_count
    from nodulekit.deploy.runtime import OnnxRunner
    from nodulekit.evaluate.seg_metrics import evaluate_seg

    def quality(row: dict) -> dict:
        metrics = evaluate_seg(OnnxRunner(row["artifact"], threads=cfg.threads), val_ds, pr_bins=PR_BINS)
        return {"onnx_params": param_count(row["artifact"]),
                **{k: metrics[k] for k in ("recall", "precision", "dice", "nodule_recall", "pr_hist") if k in metrics}}

    fill_quality(rows, quality=quality, timings=timings)


def time_rows(rows: list[dict], cfg: StudyConfig, timings: dict) -> None:
    """Latency of every deployed file in one interleaved run
    (:func:`nodulekit.deploy.measure.fill_latency`), the ratios against the baseline, and each
    variant's recall at the baseline's precision, in place."""
    from nodulekit.deploy.measure import fill_latency
    from nodulekit.deploy.rows import add_ratios
    from nodulekit.evaluate.seg_metrics import recall_at_precision

    size = cfg.bench_size
    fill_latency(rows, shape=(1, SEG_CHANNELS, size, size), runs=cfg.bench_runs, warmup=cfg.bench_warmup,
                 threads=cfg.threads, timings=timings)
    add_ratios(rows, V.BASELINE)
    base = next((r for r in rows if r["name"] == V.BASELINE and "error" not in r), None)
    if base and np.isfinite(base.get("precision", np.nan)):
        for r in rows:
            if "error" not in r and r.get("pr_hist"):
                # a variant that marks more is judged at the baseline's precision too
                matched = recall_at_precision(r["pr_hist"], base["precision"])
                r["recall_at_baseline_precision"] = matched["recall"]
                r["threshold_at_baseline_precision"] = matched["threshold"]


def machine_info(threads: int) -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def run_study(seg_ckpt, data_dir, out_dir, cfg: StudyConfig | None = None, *, datasets=None,
              before_timing: Callable[[], None] | None = None) -> dict:
    """Build, export and measure every requested variant of a segmentation checkpoint.

    Args:
        seg_ckpt: baseline checkpoint (or a :class:`SegModel`).
        data_dir: LUNA16-layout dataset (training crops, calibration and validation slices).
        out_dir: study folder: ``<variant>/`` and ``report.json`` (render it with
            :func:`nodulekit.report.render.render_report`).
        cfg: settings (defaults: :class:`StudyConfig`).
        datasets: ``(train_ds, val_ds)`` already built (skips reading ``data_dir``).
        before_timing: called once every variant is built, exported and evaluated, before the
            first latency is timed: a caller that runs other work beside the study waits for it
            there, so that the latencies are timed on a CPU that is the study's alone.

    Returns:
        The report dict written to ``report.json``.
    """
    from nodulekit.deploy.rows import new_row
    from nodulekit.io import write_json
    from nodulekit.models.checkpoint import load_seg_model

    cfg = cfg or StudyConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = V.resolve(cfg.variants)
    timings: dict = {}
    t_all = time.perf_counter()

    if datasets is None:
        from nodulekit.data.seg_dataset import build_seg_datasets

        t0 = time.perf_counter()
        datasets = build_seg_datasets(data_dir, val_fraction=cfg.val_fraction, split_file=cfg.split,
                                      samples_per_epoch=cfg.samples_per_epoch, crop=cfg.crop,
                                      seed=cfg.seed, progress=cfg.progress)
        timings["data"] = round(time.perf_counter() - t0, 2)
    train_ds, val_ds = datasets
    if isinstance(seg_ckpt, torch.nn.Module):
        baseline = seg_ckpt.eval()
    else:
        baseline, _ = load_seg_model(seg_ckpt)
    log.info("study of %s: variants %s", seg_ckpt if not isinstance(seg_ckpt, torch.nn.Module) else "model", names)
    ctx = StudyContext(cfg, train_ds, val_ds, timings, baseline)
    built = build_variants(baseline, names, ctx)

    rows = []
    for name in names:
        cand = built[name]
        row = new_row(name, "seg", label=V.LABELS[name], stages=list(V.VARIANTS[name]))
        if isinstance(cand, Exception):
            rows.append({**row, "error": f"{type(cand).__name__}: {cand}"})
            continue
        try:
            t0 = time.perf_counter()
            files = export_variant(name, cand, out_dir, cfg)
            timings[f"export:{name}"] = round(time.perf_counter() - t0, 2)
            float_model = cand.float_model or cand.model
            row.update(artifact=files["deployed"]["path"], files=files,
                       params=int(sum(p.numel() for p in float_model.parameters())),
                       format=cand.fmt, quantization=files["deployed"]["quantization"],
                       widths=float_model.current_widths().to_dict(), weight_hist=_hist(float_model),
                       **{k: v for k, v in cand.meta.items() if not k.endswith("_history")},
                       history={k: v for k, v in cand.meta.items() if k.endswith("_history")})
        except Exception as exc:
            log.exception("export of %s failed", name)
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    evaluate_rows(rows, val_ds, cfg, timings)
    npu = None
    if cfg.rknn:  # built by the toolkit and timed on a board, never on this CPU
        t0 = time.perf_counter()
        npu = npu_section(rows, out_dir, train_ds, val_ds, cfg)
        timings["npu"] = round(time.perf_counter() - t0, 2)
    cpu = None
    if cfg.openvino:
        from nodulekit.deploy.openvino import openvino_available

        if openvino_available():
            t0 = time.perf_counter()
            cpu = cpu_rows(rows, out_dir, train_ds, val_ds, cfg)
            timings["cpu"] = round(time.perf_counter() - t0, 2)
        else:
            log.info("CPU table skipped: openvino is not installed")
    if before_timing is not None:
        t0 = time.perf_counter()
        before_timing()
        timings["wait"] = round(time.perf_counter() - t0, 2)
    time_rows(rows, cfg, timings)
    if cpu is not None:
        t0 = time.perf_counter()
        cpu_latency(cpu, cfg)
        timings["cpu"] += round(time.perf_counter() - t0, 2)
    for row in [*rows, *(cpu or [])]:
        if row.get("artifact"):
            row["artifact"] = os.path.relpath(row["artifact"], out_dir)
    timings["total"] = round(time.perf_counter() - t_all, 2)

    report = {
        "baseline": V.BASELINE,
        "variants": rows,
        "machine": machine_info(cfg.threads),
        "dataset": _dataset_info(data_dir, train_ds, val_ds),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "timings_s": timings,
    }
    if npu is not None:
        report["npu"] = npu
    if cpu is not None:
        report["cpu"] = cpu
    write_json(out_dir / "report.json", report)
    return report


def _dataset_info(data_dir, train_ds, val_ds) -> dict:
    info = {"data_dir": str(data_dir) if data_dir is not None else None}
    for key, ds in (("train", train_ds), ("val", val_ds)):
        scans = getattr(ds, "scans", None)
        if scans is not None:
            info[f"{key}_scans"] = len(scans)
            info[f"{key}_uids"] = [s.uid for s in scans]
    info["val_slices"] = len(val_ds)
    info["val_nodules"] = len(getattr(val_ds, "nodules", []))
    scans = getattr(val_ds, "scans", None)
    if scans:
        info["slice_size"] = list(scans[0].shape[1:])
    return info
