"""Judging a training recipe over several seeds (``nodulekit seeds``, ``make seeds``).

One training run's CPM carries the noise of its training seed, so a recipe is judged by the mean
CPM of several training seeds and their spread; recipes scored on the same draw with the same
seeds are compared seed by seed. Each
recipe is the demo's (or the release recipe's) settings with some overridden
(:class:`nodulekit.demo.DemoConfig` fields). Every seed trains on the same synthetic draw (the one
with the recipe's hilar anatomy or share of 3 mm scans, when a recipe changes them) and is scored
on a second draw that nothing was trained or chosen on (``make froc-independent``'s), by LUNA16's
FROC.

Stages are cached by their settings under ``out``: recipes that differ only in the classifier
share the segmentation and its mined negatives, and the independent scans are segmented once per
segmentation model, whatever the number of classifiers behind it. Each finished stage leaves a
``done.json``; a rerun reuses finished stages whose files are still there, so a killed run goes on
where it stopped, and scores again the classifiers behind any model it had to train anew.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("seeds")

BASES = ("demo", "weights")
DATA_SEED = 0  # the demo's draw: every seed trains on it


@dataclass
class SeedsConfig:
    """What to train and where to score it.

    Args:
        independent: LUNA16-layout folder of the scoring draw (``subset*/``, ``annotations.csv``,
            ``annotations_excluded.csv``, ``seriesuids.csv``).
        recipes: name -> ``DemoConfig`` fields to override on the base recipe (``{}``: the base).
        base: ``demo`` (the demo's settings) or ``weights`` (the release recipe's).
        seeds: training seeds; the training data is the same draw for all of them.
        data_seed: seed of the training draw.
        threads: CPU threads of every training, the mining and the scoring (a training's own
            default is every core: two judges side by side would each take them all).
    """

    independent: str
    out: str = "runs/seeds"
    recipes: dict[str, dict] = field(default_factory=lambda: {"demo": {}})
    base: str = "demo"
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = DATA_SEED
    threads: int = 2


def parse_recipe(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:field=value,field=value`` (``DemoConfig`` fields of :data:`RECIPE_FIELDS`,
    whole numbers but for :data:`REAL_FIELDS` and the words of :data:`WORD_FIELDS`) -> ``(name, overrides)``."""
    name, _, rest = text.partition(":")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise InputError("--recipe", f"{text!r}: expected NAME or NAME:field=value,...")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in RECIPE_FIELDS:
            raise InputError("--recipe", f"{item!r}: expected field=value with field one of {', '.join(RECIPE_FIELDS)}")
        if key in WORD_FIELDS:
            if value not in WORD_FIELDS[key]:
                raise InputError("--recipe", f"{item!r}: expected one of {', '.join(WORD_FIELDS[key])}")
            overrides[key] = {"on": True, "off": False}.get(value, value)
            continue
        real = key in REAL_FIELDS
        try:
            overrides[key] = float(value) if real else int(value)
        except ValueError:
            raise InputError("--recipe", f"{item!r}: {value!r} is not a {'number' if real else 'whole number'}") from None
        if real and not (math.isfinite(overrides[key]) and overrides[key] >= 0):
            raise InputError("--recipe", f"{item!r}: {value!r} is not a finite number >= 0")
        if key in BELOW_ONE and overrides[key] >= 1:
            raise InputError("--recipe", f"{item!r}: {value!r} is not below 1")
        if key in AT_MOST_ONE and overrides[key] > 1:
            raise InputError("--recipe", f"{item!r}: {value!r} is not a share (0 to 1)")
    return name, overrides


# the settings a recipe may change: the training ones, and the generator's anatomy and slices (a
# recipe that changes them trains on the same seed's draw with that anatomy or share of 3 mm scans;
# the scans and the held-out split keep their number, so that the recipes differ in nothing else)
RECIPE_FIELDS = ("seg_epochs", "seg_steps", "seg_val_every", "seg_fn_weight", "cls_epochs", "cls_detector_from",
                 "cls_detector_every", "cls_hard_pool", "cls_steps", "cls_val_negatives", "mine_slices",
                 "cls_context", "cls_flip_slices", "cls_ema", "synth_hila", "synth_thick_share")
REAL_FIELDS = ("cls_context", "cls_ema", "seg_fn_weight", "synth_thick_share")
WORD_FIELDS = {"synth_hila": ("simple", "lobar"),  # nodulekit.data.synth.hila.HILA, without importing the generator
               "cls_flip_slices": ("on", "off")}
BELOW_ONE = ("cls_ema",)  # a decay: 1 would never move the average
AT_MOST_ONE = ("synth_thick_share",)  # a share of the draw's scans


def base_config(base: str, out: Path):
    from nodulekit.demo import DemoConfig
    from nodulekit.release import ReleaseConfig

    if base == "demo":
        return DemoConfig.for_mode(quick=False, out=str(out))
    if base == "weights":
        return ReleaseConfig(out=str(out)).demo()
    raise InputError("--base", f"{base!r}: expected one of {', '.join(BASES)}")


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _trained(settings: dict) -> dict:
    # what changes the trained model: the progress bars do not
    return {k: v for k, v in settings.items() if k != "progress"}


def _cached(folder: Path, run, ran: list[Path] | None = None):
    """``run(folder)``'s result (a :class:`nodulekit.demo.StageResult`), or the one a finished
    earlier run left in ``folder/done.json`` while the files it lists are still there."""
    from nodulekit.demo import StageResult
    from nodulekit.io import json_ready, write_json

    done = folder / "done.json"
    if done.is_file():
        doc = json.loads(done.read_text())
        files = {k: Path(v) for k, v in doc["files"].items()}
        if all(p.exists() for p in files.values()):
            return StageResult(doc["summary"], files)
        log.info("%s: a file of the finished stage is gone; running it again", folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = run(folder)
    if ran is not None:
        ran.append(folder)
    # a stage summary may hold paths and numpy numbers: kept as their text and Python numbers
    summary = json.loads(json.dumps(json_ready(result.summary), default=str))
    write_json(done, {"summary": summary, "files": {k: str(v) for k, v in result.files.items()}})
    return result


@dataclass
class _Run:
    recipe: str
    seed: int
    cfg: object  # DemoConfig
    data: object = None  # the data stage's StageResult: the draw it trains on
    seg_key: str = ""
    cls_key: str = ""
    seg: Path | None = None
    cls: Path | None = None
    train: dict = field(default_factory=dict)


def judge_recipes(cfg: SeedsConfig, *, progress: bool = True) -> dict:
    """Train every recipe at every seed, score each pair of models on the independent draw and
    write ``out/seeds.json`` and ``out/seeds.md``. Returns the summary."""
    from nodulekit import demo as D
    from nodulekit.io import atomic_write_text, write_json

    indep = Path(cfg.independent)
    for name in ("annotations.csv", "seriesuids.csv"):
        if not (indep / name).is_file():
            raise InputError(indep / name, "missing: the independent draw needs it (make froc-independent writes it)")
    if not cfg.seeds:
        raise InputError("--seeds", "no seed given")
    out = Path(cfg.out)
    t_all = time.perf_counter()
    base = base_config(cfg.base, out)
    base = replace(base, data_seed=cfg.data_seed, progress=progress)

    def draw(hila: str, thick: float):
        # the key of the default draw is the one it had before these choices existed
        key = (cfg.base, cfg.data_seed, base.scans, base.size, base.max_slices)
        key += () if hila == "simple" else (hila,)
        key += () if not thick else (("thick_share", thick),)
        draw_cfg = replace(base, synth_hila=hila, synth_thick_share=thick)
        return _cached(out / "data" / _key(*key), lambda f: D.data_stage(replace(draw_cfg, out=str(f)), f))

    runs = []
    draws: dict[tuple, object] = {}
    for name, overrides in cfg.recipes.items():
        for seed in cfg.seeds:
            dcfg = replace(base, seed=seed, **overrides)
            run = _Run(name, seed, dcfg)
            which = (dcfg.synth_hila, dcfg.synth_thick_share)
            if which not in draws:
                draws[which] = draw(*which)
            run.data = data = draws[which]
            run.seg_key = _key(data.files["data"], _trained(dcfg.seg_settings()), dcfg.mine_slices)
            run.cls_key = _key(run.seg_key, _trained(dcfg.cls_settings()))
            runs.append(run)
    retrained: set[str] = set()  # segmentations trained anew in this call
    for run in runs:
        t0, ran = time.perf_counter(), []
        files = run.data.files
        seg = _cached(out / "seg" / run.seg_key,
                      lambda f, c=run.cfg, d=files: D.train_seg_stage(replace(c, out=str(f)), f, d, cfg.threads),
                      ran)
        mined = _cached(out / "mine" / run.seg_key,
                        lambda f, c=run.cfg, d=files, s=seg: D.mine_stage(replace(c, out=str(f)), f, d,
                                                                          s.files["checkpoint"], cfg.threads))
        cls = _cached(out / "cls" / run.cls_key,
                      lambda f, c=run.cfg, d=files, m=mined: D.train_cls_stage(replace(c, out=str(f)), f, d,
                                                                               m.files["candidates"], cfg.threads),
                      ran)
        if out / "seg" / run.seg_key in ran:
            retrained.add(run.seg_key)
        if ran or run.seg_key in retrained:  # a model trained anew: its earlier score no longer stands
            (out / "score" / run.cls_key / "froc.json").unlink(missing_ok=True)
        run.seg, run.cls = seg.files["checkpoint"], cls.files["checkpoint"]
        run.train = {"seg": seg.summary.get("best", {}), "cls": cls.summary.get("best", {})}
        log.info("recipe %s seed %d trained (%.0f s, cached stages included)", run.recipe, run.seed,
                 time.perf_counter() - t0)

    scores = _score(runs, indep, out / "score", threads=cfg.threads, progress=progress)
    summary = _summarise(cfg, runs, scores, time.perf_counter() - t_all)
    write_json(out / "seeds.json", summary)
    atomic_write_text(out / "seeds.md", render_markdown(summary))
    return summary


def _score(runs: list[_Run], indep: Path, out: Path, *, threads: int, progress: bool) -> dict[str, dict]:
    """FROC of each run's models on the independent draw, keyed by ``cls_key``: the scans are
    segmented once per segmentation model and their candidates classified by every classifier
    trained behind it, as ``nodulekit detect`` does (its all-candidates table)."""
    from tqdm import tqdm

    from nodulekit.data.ct import iter_ct_inputs
    from nodulekit.deploy.runtime import load_cls_runner, load_seg_runner
    from nodulekit.detect.candidates import VIEW_MEAN, VIEWS, VIEWS_FROM, classify
    from nodulekit.detect.pipeline import MIN_SLICES, csv_row, detect_scan, write_nodules_csv
    from nodulekit.evaluate.froc import evaluate_froc
    from nodulekit.io import write_json

    scores: dict[str, dict] = {}
    by_seg: dict[str, list[_Run]] = {}
    # a score stands for the draw it was made on and the way its candidates were classified: the
    # same folder may score another draw later
    draw = {"data": str(indep.resolve()), "views": VIEWS, "views_from": VIEWS_FROM, "view_mean": VIEW_MEAN,
            **{name: hashlib.sha1((indep / name).read_bytes()).hexdigest() for name in ("annotations.csv",
                                                                                     "seriesuids.csv")}}
    for run in runs:
        done = out / run.cls_key / "froc.json"
        scored_on = out / run.cls_key / "draw.json"
        if done.is_file() and scored_on.is_file() and json.loads(scored_on.read_text()) == draw:
            scores[run.cls_key] = json.loads(done.read_text())
        elif run.cls_key not in {r.cls_key for r in by_seg.get(run.seg_key, [])}:
            by_seg.setdefault(run.seg_key, []).append(run)
    subsets = sorted(p for p in indep.glob("subset*") if p.is_dir())
    for seg_key, group in by_seg.items():
        seg_runner = load_seg_runner(group[0].seg, backend="auto", threads=threads)
        cls_runners = [load_cls_runner(r.cls, backend="auto", threads=threads) for r in group]
        rows: list[list] = [[] for _ in group]
        t0 = time.perf_counter()
        for item, ct in tqdm(iter_ct_inputs(subsets, min_slices=MIN_SLICES), desc=f"score {seg_key}", unit="scan",
                             disable=not progress):
            if isinstance(ct, Exception):
                raise ct
            found = detect_scan(ct, seg_runner, None)["candidates"]
            for k, runner in enumerate(cls_runners):
                cands = [copy.copy(c) for c in found]
                classify(ct, cands, runner)
                rows[k].extend(csv_row(ct.seriesuid, c) for c in sorted(cands, key=lambda c: -c.probability))
        seconds = time.perf_counter() - t0
        for run, run_rows in zip(group, rows):
            folder = out / run.cls_key
            folder.mkdir(parents=True, exist_ok=True)
            write_nodules_csv(folder / "nodules.csv", run_rows)
            froc = evaluate_froc(folder / "nodules.csv", indep / "annotations.csv",
                                 excluded_csv=_optional(indep / "annotations_excluded.csv"),
                                 seriesuids_csv=indep / "seriesuids.csv", out_dir=folder)
            froc["score_seconds"] = round(seconds, 1)
            write_json(folder / "draw.json", draw)
            scores[run.cls_key] = froc
        log.info("scored %d classifier(s) behind segmentation %s in %.0f s", len(group), seg_key, seconds)
    return scores


def _optional(path: Path) -> Path | None:
    return path if path.is_file() else None


def _at_threshold(froc: dict) -> dict:
    op = (froc.get("operating_points") or {}).get("at_threshold") or {}
    return {k: op.get(k) for k in ("threshold", "sensitivity", "fps_per_scan", "true_positives") if k in op}


def _summarise(cfg: SeedsConfig, runs: list[_Run], scores: dict, seconds: float) -> dict:
    recipes = []
    for name, overrides in cfg.recipes.items():
        mine = [r for r in runs if r.recipe == name]
        seeds = [{"seed": r.seed, "cpm": scores[r.cls_key]["cpm"], "cpm_ci": scores[r.cls_key].get("cpm_ci"),
                  "at_threshold": _at_threshold(scores[r.cls_key]), "seg": str(r.seg), "cls": str(r.cls),
                  "training": r.train} for r in mine]
        cpms = [s["cpm"] for s in seeds]
        recipes.append({"name": name, "overrides": overrides, "settings": _settings(mine[0].cfg),
                        "seeds": seeds, "cpm_mean": statistics.fmean(cpms),
                        "cpm_sd": statistics.stdev(cpms) if len(cpms) > 1 else None,
                        "cpm_min": min(cpms), "cpm_max": max(cpms)})
    first = next(iter(scores.values()))
    return {"base": cfg.base, "data_seed": cfg.data_seed, "seeds": list(cfg.seeds),
            "independent": {"data": str(cfg.independent), "n_scans": first.get("n_scans"),
                            "n_nodules": first.get("n_nodules")},
            "recipes": recipes, "seconds": round(seconds, 1)}


def _settings(dcfg) -> dict:
    keep = set(RECIPE_FIELDS) | {"scans", "size", "max_slices"}
    return {k: v for k, v in asdict(dcfg).items() if k in keep}


def _mean_at(recipe: dict, key: str, spec: str) -> str:
    """The seeds' mean of an ``at_threshold`` figure (the classifier's operating point)."""
    values = [s["at_threshold"][key] for s in recipe["seeds"] if s["at_threshold"].get(key) is not None]
    return format(statistics.fmean(values), spec) if values else "n/a"


def render_markdown(summary: dict) -> str:
    ind = summary["independent"]
    lines = [f"# Recipes over {len(summary['seeds'])} training seeds",
             "",
             f"Base recipe: {summary['base']}; training draw: synthetic seed {summary['data_seed']}; scored on "
             f"{ind['data']} ({ind['n_scans']} scans, {ind['n_nodules']} nodules), LUNA16 FROC.",
             "",
             "| recipe | overrides | CPM mean | SD | min | max | CPM per seed | sensitivity at 0.5 | FP/scan at 0.5 |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in summary["recipes"]:
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(base)"
        sd = "n/a" if r["cpm_sd"] is None else f"{r['cpm_sd']:.3f}"
        per = ", ".join(f"{s['seed']}: {s['cpm']:.3f}" for s in r["seeds"])
        lines.append(f"| {r['name']} | {over} | {r['cpm_mean']:.3f} | {sd} | {r['cpm_min']:.3f} | "
                     f"{r['cpm_max']:.3f} | {per} | {_mean_at(r, 'sensitivity', '.2f')} | "
                     f"{_mean_at(r, 'fps_per_scan', '.1f')} |")
    lines += ["", f"{summary['seconds'] / 60:.1f} min, cached stages included.", ""]
    return "\n".join(lines)
