"""The main job: the whole product on the synthetic default dataset, end to end.

Stages, each timed into ``report.json["timings_s"]``:
synthetic data -> train seg -> the segmentation's false positives on the training scans ->
train cls -> six compression variants (+ RKNN builds when
``.venv-rknn`` exists) -> classifier on the NPU -> detection on held-out scans -> FROC -> report.
Everything is written under ``cfg.out`` (``runs/demo`` by default).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from nodulekit import VAL_FRACTION
from nodulekit.log import get_logger

log = get_logger("demo")


@dataclass
class DemoConfig:
    """Sizes of a demo run. ``for_mode`` gives the full run or the quick one (a few minutes, every
    stage touched on small data; each run's stage times are in its report's ``timings_s``); both
    hold out a fixed number of scans, so validation, the compression study's measurements and
    detection cost the same whatever ``scans`` is (more scans give the classifier more training
    nodules).

    The ``seg_*``, ``cls_*`` and study fields set the settings of ``SegTrainConfig``,
    ``ClsTrainConfig`` and ``StudyConfig`` named in their comments; :meth:`seg_settings`,
    :meth:`cls_settings` and :meth:`study_settings` give those configs' arguments. ``None`` keeps
    the config's default.
    """

    out: str = "runs/demo"
    quick: bool = False
    seed: int = 0
    scans: int = 20
    val_fraction: float = VAL_FRACTION  # held-out share of the scans (training, compression study, detection)
    size: int = 512
    max_slices: int | None = None
    # SegTrainConfig.epochs and steps_per_epoch: fewer, longer epochs, so that validation costs less
    seg_epochs: int | None = 8
    seg_steps: int | None = 200
    # SegTrainConfig.val_every: after the last epoch only, the best one nearly always (cosine decay)
    seg_val_every: int | None = 8
    cls_epochs: int | None = 8  # ClsTrainConfig.epochs: what the demo's time allows with normed training
    # ClsTrainConfig.detector_from_epoch (its default in the full run): the epochs from this one on
    # also meet the detector's own false positives on the training scans, which the validation
    # candidates do not hold, so the last epoch is kept, not the best validation AUC
    cls_detector_from: int = 4
    cls_steps: int | None = None  # ClsTrainConfig.steps_per_epoch
    cls_val_negatives: int | None = 1000  # ClsTrainConfig.val_max_negatives: half, for a faster validation
    mine_slices: int | None = 24  # middle slices of each training scan the segmentation mines
    # StudyConfig.finetune_epochs and finetune_samples_per_epoch (in steps): the pruned model
    # relearns its function in fewer, longer epochs
    finetune_epochs: int = 3
    finetune_steps: int = 512
    qat_epochs: int = 5  # StudyConfig.qat_epochs (its default in the full run)
    optimize_steps: int = 32  # StudyConfig.samples_per_epoch (in steps) of QAT: it adjusts a trained model
    calib_slices: int = 32  # StudyConfig.calib_slices: half, for a faster int8 calibration
    bench_runs: int = 20  # StudyConfig.bench_runs (its default in the full run)
    rknn: bool = True
    workers: int = 2
    max_png: int = 10  # nodule pictures per scan

    @classmethod
    def for_mode(cls, *, quick: bool, out: str = "runs/demo", seed: int = 0, scans: int | None = None,
                 rknn: bool = True) -> "DemoConfig":
        if not quick:
            scans = scans or cls.scans
            return cls(out=out, seed=seed, scans=scans, val_fraction=_held_out_share(scans, VAL_SCANS), rknn=rknn)
        scans = scans or 6
        return cls(out=out, quick=True, seed=seed, scans=scans, val_fraction=_held_out_share(scans, 2), size=256,
                   max_slices=64, seg_epochs=2, seg_steps=25, seg_val_every=1, cls_epochs=2, cls_steps=10,
                   cls_detector_from=2,
                   mine_slices=16,
                   finetune_epochs=1, finetune_steps=8, qat_epochs=1, optimize_steps=8, calib_slices=8, bench_runs=5, rknn=rknn)

    def seg_settings(self) -> dict:
        """``SegTrainConfig`` arguments of the demo's segmentation training (but ``data`` and ``out``)."""
        return {"seed": self.seed, "val_fraction": self.val_fraction,
                **_given(epochs=self.seg_epochs, steps_per_epoch=self.seg_steps, val_every=self.seg_val_every)}

    def cls_settings(self) -> dict:
        """``ClsTrainConfig`` arguments of the demo's classifier training (but ``data``, ``out`` and
        ``detector_candidates``)."""
        from nodulekit.train.cls import ClsTrainConfig

        epochs = self.cls_epochs or ClsTrainConfig.epochs
        return {"seed": self.seed, "val_fraction": self.val_fraction, "epochs": epochs,
                "detector_from_epoch": min(self.cls_detector_from, epochs), "keep": "last",
                "val_every": max(1, epochs // 2),
                # one loader process draws the inserted nodules while the model trains (the same
                # batches as without it)
                "workers": 1,
                **_given(steps_per_epoch=self.cls_steps, val_max_negatives=self.cls_val_negatives)}

    def study_settings(self) -> dict:
        """``StudyConfig`` arguments of the demo's compression study (but ``rknn``, which depends on
        whether the RKNN toolkit is installed)."""
        from nodulekit.optimize.study import StudyConfig

        batch = StudyConfig.batch_size
        return {"seed": self.seed, "val_fraction": self.val_fraction, "finetune_epochs": self.finetune_epochs,
                "finetune_samples_per_epoch": self.finetune_steps * batch, "qat_epochs": self.qat_epochs,
                "samples_per_epoch": self.optimize_steps * batch, "calib_slices": self.calib_slices,
                "bench_runs": self.bench_runs}


VAL_SCANS = 3  # scans a full demo holds out, whatever its size


def _held_out_share(scans: int, val_scans: int) -> float:
    """The ``val_fraction`` that holds out ``val_scans`` of ``scans`` (at most half of them)."""
    return min(0.5, val_scans / max(scans, 1))


def _given(**kwargs) -> dict:
    """Only the settings that are set; the rest keep the training config's defaults."""
    return {k: v for k, v in kwargs.items() if v is not None}


class _Timer:
    """Records how long each stage took."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        log.info("== %s ==", name)
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 1)
        log.info("== %s done in %.1f s ==", name, self.timings[name])


def _synth(cfg: DemoConfig, data: Path) -> dict:
    from nodulekit.data.synth import generate_dataset

    marker = data / "synth.json"
    wanted = {"n_scans": cfg.scans, "seed": cfg.seed, "size": cfg.size, "max_slices": cfg.max_slices}
    if marker.is_file():
        # the generator is deterministic: the same arguments give the same bytes, so reuse them
        doc = json.loads(marker.read_text())
        if all(doc.get("parameters", {}).get(k) == v for k, v in wanted.items()):
            log.info("reusing the synthetic dataset in %s", data)
            return doc["summary"]
    shutil.rmtree(data, ignore_errors=True)
    return generate_dataset(data, cfg.scans, cfg.seed, size=cfg.size, max_slices=cfg.max_slices,
                            workers=cfg.workers)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage and write ``<out>/report/``. Returns the combined report dict."""
    from nodulekit.data.luna import find_series, write_seriesuids
    from nodulekit.data.split import train_val_split
    from nodulekit.detect import run_detection
    from nodulekit.evaluate.froc import evaluate_froc
    from nodulekit.train.cls import ClsTrainConfig, train_cls
    from nodulekit.train.seg import SegTrainConfig, train_seg

    out = Path(cfg.out)
    data, models = out / "data", out / "models"
    timer = _Timer()
    t_start = time.perf_counter()

    with timer.stage("synthetic_data"):
        synth = _synth(cfg, data)

    with timer.stage("train_seg"):
        seg_run = train_seg(SegTrainConfig(data=str(data), out=str(_fresh(out / "train" / "seg")), seed=cfg.seed,
                                           val_fraction=cfg.val_fraction,
                                           **_given(epochs=cfg.seg_epochs, steps_per_epoch=cfg.seg_steps,
                                                    val_every=cfg.seg_val_every)))
    models.mkdir(parents=True, exist_ok=True)
    seg_ckpt = Path(shutil.copy2(seg_run["checkpoint"], models / "seg.pt"))

    with timer.stage("mine"):
        mined = _mine(cfg, seg_ckpt, data, out / "train" / "mine")

    with timer.stage("train_cls"):
        cls_epochs = cfg.cls_epochs or ClsTrainConfig.epochs
        cls_run = train_cls(ClsTrainConfig(data=str(data), out=str(_fresh(out / "train" / "cls")), seed=cfg.seed,
                                           val_fraction=cfg.val_fraction, epochs=cls_epochs,
                                           detector_candidates=mined["csv"],
                                           detector_from_epoch=min(cfg.cls_detector_from, cls_epochs), keep="last",
                                           val_every=max(1, cls_epochs // 2),
                                           # one loader process draws the inserted nodules while the
                                           # model trains (the same batches as without it)
                                           workers=1,
                                           **_given(steps_per_epoch=cfg.cls_steps,
                                                    val_max_negatives=cfg.cls_val_negatives)))
    cls_ckpt = Path(shutil.copy2(cls_run["checkpoint"], models / "cls.pt"))

    report = _optimize(cfg, timer, seg_ckpt, cls_ckpt, data, out)

    series = find_series(data)
    _, val_uids = train_val_split(series, cfg.val_fraction)
    with timer.stage("detect"):
        detect_dir = _fresh(out / "detect")
        seg_model, cls_model = _deployed(out, seg_ckpt, cls_ckpt)
        detection = run_detection([series[u] for u in val_uids], seg_model, cls_model, detect_dir,
                                  backend=_backend(seg_model), cls_backend=_backend(cls_model),
                                  max_png=cfg.max_png)

    with timer.stage("evaluate"):
        eval_dir = _fresh(out / "evaluate")
        write_seriesuids(eval_dir / "seriesuids_val.csv", val_uids)
        froc = evaluate_froc(detect_dir / "nodules.csv", data / "annotations.csv",
                             excluded_csv=data / "annotations_excluded.csv",
                             seriesuids_csv=eval_dir / "seriesuids_val.csv", out_dir=eval_dir)

    timer.timings["total"] = round(time.perf_counter() - t_start, 1)
    report = _final_report(cfg, report, synth, seg_run, cls_run, mined, detection, froc, timer, out)
    _print_summary(report, out / "report")
    return report


def _mine(cfg: DemoConfig, seg_ckpt: Path, data: Path, run_dir: Path) -> dict:
    """The segmentation's non-nodule candidates on the middle slices of every training scan, run
    from a fp32 ONNX export (ONNX Runtime is about 2.5x faster than PyTorch here)."""
    from nodulekit.data.luna import find_series
    from nodulekit.data.split import train_val_split
    from nodulekit.deploy.export import export
    from nodulekit.detect.mine import mine_candidates

    run_dir = _fresh(run_dir)
    onnx = export(seg_ckpt, "onnx", run_dir / "seg.onnx").path
    train_uids, _ = train_val_split(find_series(data), cfg.val_fraction)
    return mine_candidates(data, onnx, run_dir / "detector_candidates.csv", uids=train_uids, backend="onnx",
                           max_slices=cfg.mine_slices, progress=False)


def _deployed(out: Path, seg_ckpt: Path, cls_ckpt: Path) -> tuple[Path, Path]:
    """The files detection runs: the exported fp32 ONNX models (what a CPU deployment executes),
    or the checkpoints where an export is missing."""
    seg_onnx, cls_onnx = out / "optimize" / "baseline" / "model.onnx", out / "classifier" / "cls3d.onnx"
    return (seg_onnx if seg_onnx.is_file() else seg_ckpt), (cls_onnx if cls_onnx.is_file() else cls_ckpt)


def _backend(path: Path) -> str:
    return "onnx" if path.suffix == ".onnx" else "torch"


def _optimize(cfg: DemoConfig, timer: _Timer, seg_ckpt: Path, cls_ckpt: Path, data: Path, out: Path) -> dict:
    """The six segmentation variants (and their RKNN builds), then the classifier's NPU forms."""
    from nodulekit.deploy.rknn import rknn_available
    from nodulekit.optimize.classifier import classifier_study
    from nodulekit.optimize.study import StudyConfig, run_study

    rknn = cfg.rknn and rknn_available()
    if cfg.rknn and not rknn:
        log.info("RKNN builds skipped: .venv-rknn is missing (`make rknn` or `make demo-rknn` creates it)")
    with timer.stage("optimize"):
        study_cfg = StudyConfig(finetune_epochs=cfg.finetune_epochs,
                                finetune_samples_per_epoch=cfg.finetune_steps * 16, qat_epochs=cfg.qat_epochs,
                                samples_per_epoch=cfg.optimize_steps * 16, calib_slices=cfg.calib_slices,
                                bench_runs=cfg.bench_runs, rknn=rknn, seed=cfg.seed, val_fraction=cfg.val_fraction)
        report = run_study(seg_ckpt, data, _fresh(out / "optimize"), study_cfg)
    with timer.stage("classifier_npu"):
        try:
            report["classifier"] = classifier_study(cls_ckpt, data, _fresh(out / "classifier"), rknn,
                                                    val_fraction=cfg.val_fraction)
        except Exception as exc:  # the report says what failed instead of losing the whole run
            log.warning("classifier study failed: %s", exc)
            report["classifier"] = [{"name": "classifier", "error": f"{type(exc).__name__}: {exc}"}]
    return report


def _final_report(cfg, report, synth, seg_run, cls_run, mined, detection, froc, timer, out: Path) -> dict:
    from nodulekit.evaluate.froc import MAX_SENSITIVITY_LOSS
    from nodulekit.report.render import render_report, write_report_json

    report_dir = _fresh(out / "report")
    ops = froc.get("operating_points", {})
    loss = (ops.get("within_loss") or {}).get("max_sensitivity_loss", MAX_SENSITIVITY_LOSS)
    labels = {"all_candidates": "segmentation alone", "at_threshold": "with classifier (p >= 0.5)",
              "within_loss": f"with classifier, fewest FP within {100 * loss:g} points"}
    report["detection"] = {
        "cpm": froc["cpm"],
        "cpm_ci": froc.get("cpm_ci"),
        "sensitivities": froc["sensitivities"],
        "fps_per_scan": froc["fps_per_scan"],
        "operating_points": [
            {"operating point": labels.get(k, k), **{m: round(v, 4) if isinstance(v, float) else v
                                                     for m, v in op.items()}}
            for k, op in ops.items() if op is not None
        ],
        "n_scans": froc.get("n_scans"),
        "n_nodules": froc.get("n_nodules"),
        "froc_png": "froc.png",
        "seconds_per_scan": detection.get("seconds_per_scan"),
    }
    report["training"] = {
        "seg": {k: v for k, v in seg_run["best"].items() if isinstance(v, (int, float))},
        "cls": {k: v for k, v in cls_run.get("best", {}).items() if isinstance(v, (int, float))},
        "mine": {k: v for k, v in mined.items() if isinstance(v, (int, float))},
    }
    report["dataset"] = {**report.get("dataset", {}), "synthetic": True,
                         **{k: v for k, v in synth.items() if isinstance(v, (int, float, str))}}
    report["demo"] = asdict(cfg)
    report["timings_s"] = timer.timings
    for src in (out / "evaluate" / "froc.png", out / "detect" / "nodules.csv", out / "evaluate" / "froc.json"):
        if src.is_file():
            shutil.copy2(src, report_dir / src.name)
    write_report_json(report, report_dir / "report.json")
    render_report(report_dir)
    return report


def _print_summary(report: dict, report_dir: Path) -> None:
    base = next((r for r in report["variants"] if r["name"] == report["baseline"] and "error" not in r), None)
    print()
    print(f"{'variant':<12} {'weights KiB':>12} {'x smaller':>10} {'latency ms':>11} {'x faster':>9} "
          f"{'recall %':>9} {'change pts':>11}")
    for r in report["variants"]:
        if "error" in r:
            print(f"{r['name']:<12} failed: {r['error']}")
            continue
        wm_ratio = base["weight_memory_kib"] / r["weight_memory_kib"] if base else float("nan")
        lat_ratio = base["latency_us"] / r["latency_us"] if base else float("nan")
        change = 100 * (r["recall"] - base["recall"]) if base else float("nan")
        print(f"{r['name']:<12} {r['weight_memory_kib']:>12,.2f} {wm_ratio:>10.2f} {r['latency_us'] / 1000:>11.1f} "
              f"{lat_ratio:>9.2f} {100 * r['recall']:>9.1f} {change:>+11.1f}")
    det = report.get("detection", {})
    if det:
        print(f"\nFROC CPM on held-out scans: {det['cpm']:.3f}"
              + (f" (95% CI {det['cpm_ci'][0]:.3f}-{det['cpm_ci'][1]:.3f})" if det.get("cpm_ci") else ""))
        for op in det.get("operating_points", []):
            print("  " + ", ".join(f"{k}: {v}" for k, v in op.items()))
    t = report.get("timings_s", {})
    print("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    print(f"report: {report_dir / 'REPORT.md'} (中文: {report_dir / 'REPORT.zh.md'})")
