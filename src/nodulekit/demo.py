"""The main job: the whole product on the synthetic default dataset, end to end.

Stages, each timed into ``report.json["timings_s"]``:
synthetic data (and the split, ``<out>/split.json``) -> train seg -> the segmentation's false
positives on the training scans -> train cls, beside six compression variants (+ RKNN builds when
``.venv-rknn`` exists) -> classifier on the NPU -> detection on the held-out scans -> FROC -> report.
The classifier trains in a child process while the study builds its variants, so those two
stages' times overlap; ``total`` is the wall time.

Every stage reads the scans it works on from ``split.json`` and returns the files it wrote
(:class:`StageResult`); the next stages take their inputs from those, and the models detection runs
are listed in ``<out>/models/deployed.json`` (:func:`write_deployed`). A failed stage stops the demo
with a :class:`DemoStageError`, after the report when the other stages could still run.
Everything is written under ``cfg.out`` (``runs/demo`` by default).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nodulekit import CLS_THRESHOLD, VAL_FRACTION
from nodulekit.errors import NodulekitError
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
    data_seed: int | None = None  # seed of the synthetic draw; None: ``seed``, the training's
    scans: int = 20
    val_fraction: float = VAL_FRACTION  # held-out share of the scans (training, compression study, detection)
    size: int = 512
    max_slices: int | None = None
    synth_hila: str = "simple"  # the draw's hilar anatomy (generate_dataset's hila)
    synth_thick_share: float = 0.0  # the draw's share of 3 mm scans (generate_dataset's thick_share)
    # SegTrainConfig.epochs and steps_per_epoch: fewer, longer epochs, so that validation costs less
    seg_epochs: int | None = 8
    seg_steps: int | None = 200
    # SegTrainConfig.val_every: after the last epoch only, the best one nearly always (cosine decay)
    seg_val_every: int | None = 8
    seg_fn_weight: float | None = None  # SegTrainConfig.fn_weight
    # ClsTrainConfig.epochs: shorter schedules lose independent CPM at every training seed
    # (`make seeds`; docs/experiments.md)
    cls_epochs: int | None = 8
    # ClsTrainConfig.detector_from_epoch (its default): the epochs from this one on also meet the
    # detector's own false positives on the training scans, which the validation candidates do not
    # hold, so the last epoch is kept, not the best validation AUC
    cls_detector_from: int = 4
    # ClsTrainConfig.detector_every and hard_pool: the detector's negatives scored before every
    # other epoch, and half the hard pool, take 44 % of the classifier's scoring off the
    # demo's longest path and lost no independent CPM at any of 3 training seeds (`make seeds`;
    # docs/experiments.md)
    cls_detector_every: int = 2
    cls_hard_pool: int | None = 512
    cls_steps: int | None = None  # ClsTrainConfig.steps_per_epoch
    cls_context: float | None = None  # ClsTrainConfig.context: one channel, as dlwpt
    cls_flip_slices: bool | None = None  # ClsTrainConfig.flip_slices
    cls_ema: float | None = None  # ClsTrainConfig.ema
    cls_val_negatives: int | None = 1000  # ClsTrainConfig.val_max_negatives: half, for a faster validation
    mine_slices: int | None = 24  # middle slices of each training scan the segmentation mines
    # StudyConfig.finetune_epochs and finetune_samples_per_epoch (in steps): the pruned model
    # relearns its function in fewer, longer epochs
    finetune_epochs: int = 3
    finetune_steps: int = 512
    # StudyConfig.qat_epochs: QAT adjusts a trained model, and each epoch's validation of the
    # fake-quantized model costs more than its training; later epochs lowered the validation
    # recall of both QAT variants, and one epoch's learning rate decays to zero within it
    qat_epochs: int = 1
    optimize_steps: int = 32  # StudyConfig.samples_per_epoch (in steps) of QAT: it adjusts a trained model
    calib_slices: int = 32  # StudyConfig.calib_slices: half, for a faster int8 calibration
    bench_runs: int = 10  # StudyConfig.bench_runs: half; the medians of interleaved runs are stable
    rknn: bool = True
    workers: int = 2
    max_png: int = 10  # nodule pictures per scan
    progress: bool = True  # the trainings' progress bars

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
        return {"seed": self.seed, "val_fraction": self.val_fraction, "progress": self.progress,
                **_given(epochs=self.seg_epochs, steps_per_epoch=self.seg_steps, val_every=self.seg_val_every,
                         fn_weight=self.seg_fn_weight)}

    def cls_settings(self) -> dict:
        """``ClsTrainConfig`` arguments of the demo's classifier training (but ``data``, ``out`` and
        ``detector_candidates``)."""
        from nodulekit.train.cls import ClsTrainConfig

        epochs = self.cls_epochs or ClsTrainConfig.epochs
        return {"seed": self.seed, "val_fraction": self.val_fraction, "progress": self.progress, "epochs": epochs,
                "detector_from_epoch": min(self.cls_detector_from, epochs), "detector_every": self.cls_detector_every,
                "keep": "last",
                # the last epoch is kept whatever an earlier validation says: validate it alone
                "val_every": epochs,
                # one loader process draws the inserted nodules while the model trains (the same
                # batches as without it)
                "workers": 1,
                **_given(steps_per_epoch=self.cls_steps, val_max_negatives=self.cls_val_negatives,
                         hard_pool=self.cls_hard_pool, context=self.cls_context,
                         flip_slices=self.cls_flip_slices, ema=self.cls_ema)}

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


class DemoStageError(NodulekitError):
    """A stage of the demo failed; ``str(err)`` names the stage and the problem in one line."""

    def __init__(self, failures: dict[str, str]):
        self.failures = dict(failures)
        super().__init__("; ".join(f"stage {name} failed: {problem}" for name, problem in self.failures.items()))


@dataclass
class StageResult:
    """What a stage hands to the next ones: its summary (for the report) and the files it wrote,
    by role. Later stages read these paths instead of knowing where an earlier stage writes."""

    summary: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


class _Stages:
    """Runs the stages: times each into ``timings`` and records each failure in ``failed``.

    A failed stage that later ones need stops the demo with a :class:`DemoStageError`; one they can
    do without (``optional``) is recorded, the demo goes on, and :func:`run_demo` raises at the end,
    once the report holding the failure is written.
    """

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.failed: dict[str, str] = {}

    @contextmanager
    def stage(self, name: str, *, optional: bool = False):
        """Time the block as stage ``name``; the block may set the yielded dict's ``seconds`` to
        the stage's own time instead (work that ran in a child process beside other stages)."""
        log.info("== %s ==", name)
        t0 = time.perf_counter()
        own: dict = {}
        try:
            yield own
        except DemoStageError:
            raise
        except Exception as exc:
            log.error("stage %s failed", name, exc_info=True)
            self.failed[name] = _one_line(exc)
            if not optional:
                raise DemoStageError(self.failed) from exc
        self.timings[name] = round(own.get("seconds", time.perf_counter() - t0), 1)
        log.info("== %s done in %.1f s ==", name, self.timings[name])

    def check_scans(self, name: str, failed: list[dict]) -> None:
        """Record scans a stage could not process as a failure of that stage (its figures would be
        computed on fewer scans than the split holds)."""
        if failed:
            self.failed[name] = f"{len(failed)} scan(s) failed, e.g. {failed[0].get('error')}"


def _one_line(exc: BaseException) -> str:
    lines = (str(exc) if isinstance(exc, ChildStageError) else f"{type(exc).__name__}: {exc}").splitlines()
    return lines[0] if lines else type(exc).__name__


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _backend(path: Path) -> str:
    return "onnx" if path.suffix == ".onnx" else "torch"


def _fast(backend: str) -> str:
    # an ONNX file runs in the fastest CPU runtime installed (OpenVINO reads it: the same
    # probabilities as ONNX Runtime to float rounding, faster on x86), else ONNX Runtime
    return "auto" if backend == "onnx" else backend


class Beside:
    """``fn(*args, **kwargs)`` run in a child process while this one goes on.

    :meth:`result` waits for it and returns ``(value, seconds)``, or raises the child's exception;
    :meth:`stop` ends the child if it still runs (after a failure of the work beside it);
    :meth:`set_threads` changes the child's thread budget (:mod:`nodulekit.train.threads`). The
    child starts fresh (``spawn``): it shares no threads or open runtimes with this process, and
    its DataLoader may start workers of its own. Its log lines go to the same console.
    """

    def __init__(self, fn, *args, **kwargs):
        import logging
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe(duplex=False)
        self._threads = ctx.Value("i", 0)
        verbose = logging.getLogger("nodulekit").getEffectiveLevel() <= logging.DEBUG
        self._proc = ctx.Process(target=_run_beside, args=(child_end, self._threads, verbose, fn, args, kwargs),
                                 name=f"nodulekit-{getattr(fn, '__name__', 'stage')}")
        self._proc.start()
        child_end.close()
        self._outcome = None

    def wait(self) -> None:
        """Block until the child has finished (at once if it has)."""
        if self._outcome is None:
            try:
                self._outcome = self._conn.recv()
            except EOFError:  # killed, or out of memory: no exception came back
                self._proc.join()
                self._outcome = ("error", f"the process {self._proc.name} died (exit code {self._proc.exitcode})")
            self._proc.join()

    def set_threads(self, n: int) -> None:
        """Let the child's training use ``n`` threads from its next step on."""
        self._threads.value = int(n)

    def result(self):
        self.wait()
        kind, value = self._outcome
        if kind == "error":
            raise value if isinstance(value, BaseException) else ChildStageError(value)
        return value

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()


class Inline(Beside):
    """:class:`Beside`'s interface, run at once in this process (one core gains nothing from a
    child)."""

    def __init__(self, fn, *args, **kwargs):
        try:
            self._outcome = ("ok", _timed(fn, args, kwargs))
        except Exception as exc:
            self._outcome = ("error", exc)

    def wait(self) -> None:
        pass

    def set_threads(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


class ChildStageError(NodulekitError):
    """A stage run in a child process failed; ``str(err)`` is the child's exception in one line,
    its type and message."""


def _timed(fn, args, kwargs) -> tuple:
    """``(fn(*args, **kwargs), its seconds)``: what :meth:`Beside.result` returns."""
    t0 = time.perf_counter()
    return fn(*args, **kwargs), round(time.perf_counter() - t0, 1)


def _run_beside(conn, threads, verbose: bool, fn, args, kwargs) -> None:
    from nodulekit.log import setup_logging
    from nodulekit.train import threads as budget

    setup_logging(verbose)
    budget.attach(threads)
    try:
        # only plain data crosses back: an exception whose constructor differs from its arguments
        # would fail to unpickle in the parent
        conn.send(("ok", _timed(fn, args, kwargs)))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        conn.send(("error", "interrupted"))
    except BaseException as exc:
        log.error("%s failed", getattr(fn, "__name__", "the stage"), exc_info=True)
        conn.send(("error", _one_line(exc)))
    conn.close()


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage and write ``<out>/report/``. Returns the combined report dict.

    Raises:
        DemoStageError: a stage failed. When the stages after it could still run, the report is
            written first and lists the failure under ``failed_stages``.
    """
    from nodulekit.deploy.rknn import rknn_available

    out = Path(cfg.out)
    stages = _Stages()
    t_start = time.perf_counter()
    rknn = cfg.rknn and rknn_available()
    if cfg.rknn and not rknn:
        log.info("RKNN builds skipped: .venv-rknn is missing (`make rknn` or `make demo-rknn` creates it)")

    with stages.stage("synthetic_data"):
        data = data_stage(cfg, out)
    with stages.stage("train_seg"):
        seg = train_seg_stage(cfg, out, data.files)
    with stages.stage("mine"):
        mined = mine_stage(cfg, out, data.files, seg.files["checkpoint"])
    stages.check_scans("mine", mined.summary.get("failed", []))
    # the classifier trains in a child process on one core while the study builds, exports and
    # evaluates on the other, and on both once the study only waits; the study times its
    # latencies after the training. Each slows the other, but the study's small-crop training
    # leaves most of a second core idle, so the two end sooner together than in turn. The child
    # logs its epochs without a progress bar, which would garble the study's.
    import torch

    threads = torch.get_num_threads()
    training = (Beside if (os.cpu_count() or 1) >= 2 else Inline)(
        train_cls_stage, replace(cfg, progress=False), out, data.files, mined.files["candidates"], threads=1)

    def before_timing() -> None:
        # this process only waits from here on: the training may have both cores
        log.info("waiting for the classifier's training before timing the variants")
        training.set_threads(threads)
        training.wait()
        torch.set_num_threads(threads)

    torch.set_num_threads(1)
    try:
        with stages.stage("optimize"):
            study = optimize_stage(cfg, out, data.files, seg.files["checkpoint"], rknn, before_timing=before_timing)
        with stages.stage("train_cls") as own:  # its own time, beside the study's
            cls, own["seconds"] = training.result()
    finally:
        torch.set_num_threads(threads)
        training.stop()
    classifier = StageResult({"rows": []})
    with stages.stage("classifier_npu", optional=True):
        classifier = classifier_stage(cfg, out, data.files, cls.files["checkpoint"], rknn)
    if "classifier_npu" in stages.failed:
        classifier.summary["rows"] = [{"name": "classifier", "error": stages.failed["classifier_npu"]}]
    deployed = write_deployed(out / "models",
                              seg=study.files.get("onnx") or seg.files["checkpoint"],
                              cls=classifier.files.get("onnx") or cls.files["checkpoint"])
    with stages.stage("detect"):
        detection = detect_stage(cfg, out, data.files, deployed)
    stages.check_scans("detect", detection.summary.get("failed", []))
    with stages.stage("evaluate"):
        froc = evaluate_stage(out, data.files, detection.files["csv"])

    stages.timings["total"] = round(time.perf_counter() - t_start, 1)
    report = study.summary
    report["classifier"] = classifier.summary["rows"]
    if stages.failed:
        report["failed_stages"] = dict(stages.failed)
    report = _final_report(cfg, report, data, seg, cls, mined, detection, froc, stages.timings, out)
    _print_summary(report, out / "report")
    if stages.failed:
        raise DemoStageError(stages.failed)
    return report


def data_stage(cfg: DemoConfig, out: Path) -> StageResult:
    """The synthetic dataset (reused when its parameters match), and the split every later stage
    uses, written once as ``<out>/split.json``."""
    from nodulekit.data.luna import find_series
    from nodulekit.data.split import train_val_split, write_split

    data = out / "data"
    summary = _synth(cfg, data)
    split = write_split(out / "split.json", *train_val_split(find_series(data), cfg.val_fraction))
    return StageResult(summary, {"data": data, "split": split, "annotations": data / "annotations.csv",
                                 "excluded": data / "annotations_excluded.csv"})


def _synth(cfg: DemoConfig, data: Path) -> dict:
    from nodulekit.data.synth import generate_dataset
    from nodulekit.data.synth.scan import GENERATOR_VERSION

    marker = data / "synth.json"
    seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    wanted = {"n_scans": cfg.scans, "seed": seed, "size": cfg.size, "max_slices": cfg.max_slices,
              "hila": cfg.synth_hila, "thick_share": cfg.synth_thick_share, "version": GENERATOR_VERSION}
    if marker.is_file():
        # the generator is deterministic: the same arguments and version give the same bytes, so
        # reuse them
        doc = json.loads(marker.read_text())
        # a draw from before these choices existed was drawn with their defaults
        have = {"hila": "simple", "thick_share": 0.0, **doc.get("parameters", {})}
        if all(have.get(k) == v for k, v in wanted.items()):
            log.info("reusing the synthetic dataset in %s", data)
            return doc["summary"]
    shutil.rmtree(data, ignore_errors=True)
    return generate_dataset(data, cfg.scans, seed, size=cfg.size, max_slices=cfg.max_slices,
                            workers=cfg.workers, hila=cfg.synth_hila, thick_share=cfg.synth_thick_share)


def train_seg_stage(cfg: DemoConfig, out: Path, data: dict[str, Path], threads: int | None = None) -> StageResult:
    """The segmentation model, trained on the split's training scans (on ``threads`` CPU threads,
    default all cores); its best checkpoint is copied to ``<out>/models/seg.pt``."""
    from nodulekit.train.seg import SegTrainConfig, train_seg

    run = train_seg(SegTrainConfig(data=str(data["data"]), out=str(_fresh(out / "train" / "seg")),
                                   split=str(data["split"]), threads=threads, **cfg.seg_settings()))
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    return StageResult(run, {"checkpoint": Path(shutil.copy2(run["checkpoint"], models / "seg.pt"))})


def mine_stage(cfg: DemoConfig, out: Path, data: dict[str, Path], seg_ckpt: Path, threads: int = 2) -> StageResult:
    """The segmentation's non-nodule candidates on the middle slices of every training scan of the
    split, run from a fp32 ONNX export (ONNX Runtime is faster than PyTorch on a CPU) on ``threads``
    CPU threads."""
    from nodulekit.data.split import load_split
    from nodulekit.deploy.export import export
    from nodulekit.detect.mine import mine_candidates

    run_dir = _fresh(out / "train" / "mine")
    onnx = export(seg_ckpt, "onnx", run_dir / "seg.onnx").path
    train_uids, _ = load_split(data["split"])
    csv = run_dir / "detector_candidates.csv"
    mined = mine_candidates(data["data"], onnx, csv, uids=train_uids, backend="auto",
                            max_slices=cfg.mine_slices, threads=threads, progress=False)
    return StageResult(mined, {"onnx": Path(onnx), "candidates": Path(mined["csv"])})


def train_cls_stage(cfg: DemoConfig, out: Path, data: dict[str, Path], detector_candidates: Path,
                    threads: int | None = None) -> StageResult:
    """The classifier, trained on the split's training scans and the mined candidates (on
    ``threads`` CPU threads, default all cores); its last checkpoint is copied to
    ``<out>/models/cls.pt``."""
    from nodulekit.train.cls import ClsTrainConfig, train_cls

    settings = cfg.cls_settings()
    if threads is not None:
        settings["threads"] = threads
    run = train_cls(ClsTrainConfig(data=str(data["data"]), out=str(_fresh(out / "train" / "cls")),
                                   detector_candidates=str(detector_candidates), split=str(data["split"]),
                                   **settings))
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    return StageResult(run, {"checkpoint": Path(shutil.copy2(run["checkpoint"], models / "cls.pt"))})


def optimize_stage(cfg: DemoConfig, out: Path, data: dict[str, Path], seg_ckpt: Path, rknn: bool,
                   before_timing=None) -> StageResult:
    """The six segmentation variants (and their RKNN builds) under ``<out>/optimize/``; ``onnx``
    is the baseline's deployed fp32 ONNX, when it was exported. ``before_timing`` is
    :func:`nodulekit.optimize.study.run_study`'s."""
    from nodulekit.optimize.study import StudyConfig, run_study
    from nodulekit.report.render import render_report

    study_dir = _fresh(out / "optimize")
    study_cfg = StudyConfig(rknn=rknn, split=str(data["split"]), **cfg.study_settings())
    report = run_study(seg_ckpt, data["data"], study_dir, study_cfg, before_timing=before_timing)
    render_report(study_dir)
    files = {"report": study_dir / "report.json"}
    base = next((r for r in report["variants"] if r["name"] == report["baseline"] and r.get("artifact")), None)
    if base is not None and (study_dir / base["artifact"]).suffix == ".onnx":
        files["onnx"] = study_dir / base["artifact"]
    return StageResult(report, files)


def classifier_stage(cfg: DemoConfig, out: Path, data: dict[str, Path], cls_ckpt: Path, rknn: bool) -> StageResult:
    """The classifier's deployment forms (ONNX, and RKNN builds) under ``<out>/classifier/``;
    ``onnx`` is its fp32 3D ONNX export."""
    from nodulekit.optimize.classifier import classifier_study

    cls_dir = _fresh(out / "classifier")
    rows = classifier_study(cls_ckpt, data["data"], cls_dir, rknn, val_fraction=cfg.val_fraction,
                            split_file=data["split"])
    onnx = cls_dir / "cls3d.onnx"  # the name classifier_study gives the 3D export
    return StageResult({"rows": rows}, {"onnx": onnx} if onnx.is_file() else {})


DEPLOYED_JSON = "deployed.json"


def write_deployed(models_dir: Path, *, seg: Path, cls: Path) -> dict:
    """Write ``<models_dir>/deployed.json``: the model files detection runs and their runtimes,
    with ``detect_args``, the ``nodulekit detect`` options that run them (the Makefile's
    ``froc-independent`` reads those). The fp32 ONNX exports are what a CPU deployment executes;
    a checkpoint stands in where an export is missing. Paths are kept as the stages wrote them
    (relative to the demo's working folder when ``--out`` is relative)."""
    from nodulekit.io import atomic_write_text

    doc = {"seg": str(seg), "backend": _backend(Path(seg)), "cls": str(cls), "cls_backend": _backend(Path(cls))}
    doc["detect_args"] = ["--seg", doc["seg"], "--backend", doc["backend"],
                          "--cls", doc["cls"], "--cls-backend", doc["cls_backend"]]
    atomic_write_text(Path(models_dir) / DEPLOYED_JSON, json.dumps(doc, indent=1) + "\n")
    return doc


def detect_stage(cfg: DemoConfig, out: Path, data: dict[str, Path], deployed: dict) -> StageResult:
    """Detection with the deployed models on the split's held-out scans."""
    from nodulekit.data.luna import select_series
    from nodulekit.data.split import load_split
    from nodulekit.detect import run_detection

    _, val_uids = load_split(data["split"])
    scans = select_series(data["data"], val_uids)
    detection = run_detection(list(scans.values()), deployed["seg"], deployed["cls"], _fresh(out / "detect"),
                              backend=_fast(deployed["backend"]), cls_backend=_fast(deployed["cls_backend"]),
                              max_png=cfg.max_png, html=True)
    return StageResult(detection, {"csv": Path(detection["csv"]), "json": Path(detection["json"])})


def evaluate_stage(out: Path, data: dict[str, Path], detections_csv: Path) -> StageResult:
    """FROC of the detections over the split's held-out scans."""
    from nodulekit.data.luna import write_seriesuids
    from nodulekit.data.split import load_split
    from nodulekit.evaluate.froc import evaluate_froc

    eval_dir = _fresh(out / "evaluate")
    _, val_uids = load_split(data["split"])
    uids_csv = write_seriesuids(eval_dir / "seriesuids_val.csv", val_uids)
    froc = evaluate_froc(detections_csv, data["annotations"], excluded_csv=data["excluded"],
                         seriesuids_csv=uids_csv, out_dir=eval_dir)
    files = {"seriesuids": uids_csv, "json": eval_dir / "froc.json"}
    if (eval_dir / "froc.png").is_file():
        files["png"] = eval_dir / "froc.png"
    return StageResult(froc, files)


def _final_report(cfg, report, data, seg, cls, mined, detection, froc, timings, out: Path) -> dict:
    from nodulekit.evaluate.froc import MAX_SENSITIVITY_LOSS
    from nodulekit.report.render import render_report, write_report_json

    report_dir = _fresh(out / "report")
    ops = froc.summary.get("operating_points", {})
    loss = (ops.get("within_loss") or {}).get("max_sensitivity_loss", MAX_SENSITIVITY_LOSS)
    labels = {"all_candidates": "segmentation alone", "at_threshold": f"with classifier (p >= {CLS_THRESHOLD:g})",
              "within_loss": f"with classifier, fewest FP within {100 * loss:g} points"}
    report["detection"] = {
        "cpm": froc.summary["cpm"],
        "cpm_ci": froc.summary.get("cpm_ci"),
        "sensitivities": froc.summary["sensitivities"],
        "fps_per_scan": froc.summary["fps_per_scan"],
        "operating_points": [
            {"operating point": labels.get(k, k), **{m: round(v, 4) if isinstance(v, float) else v
                                                     for m, v in op.items()}}
            for k, op in ops.items() if op is not None
        ],
        "n_scans": froc.summary.get("n_scans"),
        "n_nodules": froc.summary.get("n_nodules"),
        "froc_png": "froc.png",
        "seconds_per_scan": detection.summary.get("seconds_per_scan"),
        # each held-out scan's viewer, relative to the report so that the link opens from REPORT.md
        "viewers": {s["seriesuid"]: os.path.relpath(s["viewer"], report_dir)
                    for s in detection.summary.get("scans", []) if s.get("viewer")},
    }
    report["training"] = {
        "seg": {k: v for k, v in seg.summary["best"].items() if isinstance(v, (int, float))},
        "cls": {k: v for k, v in cls.summary.get("best", {}).items() if isinstance(v, (int, float))},
        "mine": {k: v for k, v in mined.summary.items() if isinstance(v, (int, float))},
    }
    report["dataset"] = {**report.get("dataset", {}), "synthetic": True,
                         **{k: v for k, v in data.summary.items() if isinstance(v, (int, float, str))}}
    report["demo"] = asdict(cfg)
    report["timings_s"] = timings
    for src in (froc.files.get("png"), detection.files["csv"], froc.files["json"]):
        if src is not None and src.is_file():
            shutil.copy2(src, report_dir / src.name)
    write_report_json(report, report_dir / "report.json")
    render_report(report_dir)
    return report


def _cell(v, width: int, spec: str) -> str:
    """``v`` formatted with ``spec`` and right-aligned in ``width`` (``n/a`` when the row lacks it)."""
    return f"{'n/a' if v is None else format(v, spec):>{width}}"


def _print_summary(report: dict, report_dir: Path) -> None:
    print()
    print(f"{'variant':<12} {'weights KiB':>12} {'x smaller':>10} {'latency ms':>11} {'x faster':>9} "
          f"{'recall %':>9} {'change pts':>11}")
    for r in report["variants"]:
        if "error" in r:
            print(f"{r['name']:<12} failed: {r['error']}")
            continue
        # the ratios to the baseline are the study's, as its rows hold them
        print(f"{r['name']:<12} {r['weight_memory_kib']:>12,.2f} {_cell(r.get('weight_memory_ratio'), 10, '.2f')} "
              f"{r['latency_us'] / 1000:>11.1f} {_cell(r.get('latency_ratio'), 9, '.2f')} "
              f"{100 * r['recall']:>9.1f} {_cell(r.get('recall_change_pts'), 11, '+.1f')}")
    det = report.get("detection", {})
    if det:
        print(f"\nFROC CPM on held-out scans: {det['cpm']:.3f}"
              + (f" (95% CI {det['cpm_ci'][0]:.3f}-{det['cpm_ci'][1]:.3f})" if det.get("cpm_ci") else ""))
        for op in det.get("operating_points", []):
            print("  " + ", ".join(f"{k}: {v}" for k, v in op.items()))
    for name, problem in report.get("failed_stages", {}).items():
        print(f"\nFAILED stage {name}: {problem}")
    t = report.get("timings_s", {})
    print("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    print(f"report: {report_dir / 'REPORT.md'} (中文: {report_dir / 'REPORT.zh.md'})")
