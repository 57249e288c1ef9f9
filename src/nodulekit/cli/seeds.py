"""``nodulekit seeds``: judge training recipes by their mean CPM over several seeds (``make seeds``)."""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.cli._config import number_type, output_folder
    from nodulekit.seeds import BASES, DATA_SEED, REAL_FIELDS, RECIPE_FIELDS, WORD_FIELDS

    p = sub.add_parser(
        "seeds",
        help="train recipes at several seeds and score each on an independent draw (mean CPM and spread)",
        description="Train each recipe (the demo's or the release recipe's settings, some overridden) at every "
                    "seed on the same synthetic draw (synth_hila=lobar: the draw with lobar hila; synth_thick_share=F: "
                    "that share of its scans at 3 mm), detect on an "
                    "independent LUNA16-layout draw and score "
                    "LUNA16's FROC; print and write each recipe's mean CPM, its spread and the CPM per seed "
                    "(OUT/seeds.json, OUT/seeds.md). Finished stages are cached under OUT and reused.")
    p.add_argument("independent", help="the scoring draw: a LUNA16-layout folder with annotations.csv and "
                                       "seriesuids.csv (make froc-independent generates runs/independent/data)")
    p.add_argument("--recipe", action="append", default=None, metavar="NAME[:FIELD=VALUE,...]",
                   help="a recipe to judge, repeatable (default: the base alone, named after it); fields: "
                        + ", ".join(RECIPE_FIELDS) + " (whole numbers; " + " and ".join(REAL_FIELDS)
                        + " real numbers; " + "; ".join(f"{k} {' or '.join(v)}" for k, v in WORD_FIELDS.items())
                        + ")")
    p.add_argument("--base", choices=BASES, default="demo", help="recipe the overrides start from (default: demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--data-seed", type=int, default=DATA_SEED,
                   help="seed of the training draw, the same for every seed (default: %(default)s)")
    p.add_argument("--threads", type=number_type(int, "positive"), default=2,
                   help="CPU threads of the trainings, the mining and the scoring; two runs side by side on N "
                        "cores want N/2 each (default: 2)")
    p.add_argument("--out", default="runs/seeds", type=output_folder, help="working folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (training's and scoring's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.seeds import SeedsConfig, judge_recipes, parse_recipe, render_markdown

    recipes = dict(parse_recipe(r) for r in (args.recipe or [args.base]))
    cfg = SeedsConfig(independent=args.independent, out=args.out, recipes=recipes, base=args.base,
                      seeds=tuple(dict.fromkeys(args.seeds)), data_seed=args.data_seed, threads=args.threads)
    summary = judge_recipes(cfg, progress=not args.no_progress)
    print(render_markdown(summary))
    return 0
