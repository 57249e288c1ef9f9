"""The release recipe (``make weights``, ``nodulekit weights``): the weights that ship with the
package, trained like the demo's models on a larger synthetic draw for longer.

It runs the demo's training stages (:mod:`nodulekit.demo`: synthetic data and split, segmentation,
mining of its false positives, classifier), then detection and FROC on the held-out scans, and
installs the pair with its manifest (:func:`nodulekit.models.shipped.install_weights`) when
``install`` is set. Everything else goes under ``out``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from nodulekit.demo import DemoConfig, _held_out_share, _Stages
from nodulekit.log import get_logger

log = get_logger("release")

RELEASE_SEED = 100  # a draw of its own: the demo (seed 0) and the independent draw (seed 1) stay unseen
RUN_INFO = "weights.json"  # a run's record in its folder: what the manifest holds but the files


@dataclass
class ReleaseConfig:
    """Sizes of the release recipe; ``demo`` holds the stage settings the demo's functions read."""

    out: str = "runs/weights"
    install: bool = True
    scans: int = 60
    val_scans: int = 4
    seed: int = RELEASE_SEED
    seg_epochs: int = 12
    seg_steps: int = 300
    cls_epochs: int = 12
    # the classifier's loss still falls at the end of 120 steps an epoch, and twice as many lift
    # the independent CPM at the cost of about 10 more minutes (docs/experiments.md)
    cls_steps: int = 240
    cls_detector_from: int = 5
    # the classifier scores the detector's negatives before each of its epochs from
    # cls_detector_from, and a 1,024-candidate hard pool before each after the first: set here, so
    # that the shipped weights' recipe does not follow what the demo does to save time
    cls_detector_every: int = 1
    cls_hard_pool: int = 1024
    mine_slices: int = 24
    # share of the draw's scans with 3 mm slices (generate_scan's thick_share)
    thick_share: float = 0.0
    size: int = 512  # smaller and shorter scans only for trying the recipe out
    max_slices: int | None = None

    def demo(self) -> DemoConfig:
        return replace(DemoConfig(), out=self.out, seed=self.seed, scans=self.scans, size=self.size,
                       max_slices=self.max_slices, synth_thick_share=self.thick_share,
                       val_fraction=_held_out_share(self.scans, self.val_scans), seg_epochs=self.seg_epochs,
                       seg_steps=self.seg_steps, seg_val_every=max(1, self.seg_epochs // 4),
                       cls_epochs=self.cls_epochs, cls_steps=self.cls_steps,
                       cls_detector_from=self.cls_detector_from, cls_detector_every=self.cls_detector_every,
                       cls_hard_pool=self.cls_hard_pool, mine_slices=self.mine_slices, rknn=False)


def _finite(row: dict) -> dict:
    # the manifest is strict JSON: a metric without a value (NaN) is left out
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def build_weights(cfg: ReleaseConfig) -> dict:
    """Train, check and (with ``cfg.install``) install the shipped weights. Returns the manifest
    written (or that would be written)."""
    from nodulekit import demo as D
    from nodulekit.io import write_json
    from nodulekit.models.shipped import WEIGHTS_DIR, install_weights

    out = Path(cfg.out)
    dcfg = cfg.demo()
    stages = _Stages()
    t0 = time.perf_counter()
    with stages.stage("synthetic_data"):
        data = D.data_stage(dcfg, out)
    with stages.stage("train_seg"):
        seg = D.train_seg_stage(dcfg, out, data.files)
    with stages.stage("mine"):
        mined = D.mine_stage(dcfg, out, data.files, seg.files["checkpoint"])
    with stages.stage("train_cls"):
        cls = D.train_cls_stage(dcfg, out, data.files, mined.files["candidates"])
    deployed = D.write_deployed(out / "models", seg=seg.files["checkpoint"], cls=cls.files["checkpoint"])
    with stages.stage("detect"):
        detection = D.detect_stage(dcfg, out, data.files, {**deployed, "backend": "auto", "cls_backend": "auto"})
    with stages.stage("evaluate"):
        froc = D.evaluate_stage(out, data.files, detection.files["csv"])
    seconds = round(time.perf_counter() - t0, 1)
    info = {
        "recipe": {"command": "make weights", **asdict(cfg)},
        "trained_on": f"synthetic LUNA16-format CT (nodulekit synth, seed {cfg.seed}, {cfg.scans} scans, "
                      f"{cfg.val_scans} held out"
                      + (f", a share of {cfg.thick_share:g} with 3 mm slices" if cfg.thick_share else "") + ")",
        "seconds": seconds,
        "stage_seconds": stages.timings,
        "held_out": {"cpm": froc.summary.get("cpm"), "cpm_ci": froc.summary.get("cpm_ci"),
                     "n_scans": froc.summary.get("n_scans"), "n_nodules": froc.summary.get("n_nodules")},
        "training": {"seg": _finite(seg.summary.get("best", {})), "cls": _finite(cls.summary.get("best", {}))},
        "created": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    log.info("weights trained in %.0f s; held-out CPM %.3f", seconds, info["held_out"]["cpm"] or float("nan"))
    # beside the pair it describes, so that a run judged after training can be installed as it is
    # (install_run)
    write_json(out / RUN_INFO, {**info, "checkpoints": {"seg": str(Path(seg.files["checkpoint"]).resolve()),
                                                       "cls": str(Path(cls.files["checkpoint"]).resolve())}})
    if not cfg.install:
        return info
    doc = install_weights(seg.files["checkpoint"], cls.files["checkpoint"], info)
    log.info("installed into %s", WEIGHTS_DIR)
    return doc


def install_run(out: str | Path, folder: str | Path | None = None) -> dict:
    """Install the pair a finished :func:`build_weights` run left in ``out`` (its record,
    ``weights.json``, names the checkpoints) into ``folder`` (default: the package's), as that run
    would have with ``install``. Returns the manifest written."""
    import json

    from nodulekit.errors import InputError
    from nodulekit.models.shipped import WEIGHTS_DIR, install_weights

    out = Path(out)
    record = out / RUN_INFO
    if not record.is_file():
        raise InputError(record, "missing: not the folder of a finished `nodulekit weights` run")
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(record, f"unreadable run record ({exc})") from None
    checkpoints = info.pop("checkpoints", None) if isinstance(info, dict) else None
    if not (isinstance(info, dict) and isinstance(info.get("recipe"), dict) and isinstance(checkpoints, dict)
            and all(isinstance(checkpoints.get(k), str) for k in ("seg", "cls"))):
        raise InputError(record, "holds no recipe and checkpoints: not written by `nodulekit weights`")
    pair = [Path(checkpoints[kind]) for kind in ("seg", "cls")]
    for path in pair:
        if not path.is_file():
            raise InputError(path, "missing: the run's checkpoint is gone")
    folder = WEIGHTS_DIR if folder is None else Path(folder)
    doc = install_weights(*pair, info, folder)
    log.info("installed %s into %s", out, folder)
    return doc
