"""``nodulekit optimize``: the compression study (prune, PTQ, QAT and their combinations).

The options are :class:`nodulekit.optimize.study.StudyConfig`'s fields; an option left out keeps
its default.
"""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.cli._config import add_config_options
    from nodulekit.deploy.ptq import CALIB_METHODS
    from nodulekit.optimize.search import SearchConfig
    from nodulekit.optimize.study import StudyConfig
    from nodulekit.optimize.variants import VARIANTS

    p = sub.add_parser("optimize", help="build, export and measure the compression variants",
                       description="Build the compression variants of a segmentation checkpoint, export them, "
                                   "measure them on the deployed files and write report.json + REPORT.md.")
    p.add_argument("--seg", required=True, help="baseline segmentation checkpoint")
    p.add_argument("--data", required=True, help="LUNA16-layout dataset folder")
    p.add_argument("--out", required=True, help="study folder")
    add_config_options(p, StudyConfig, variants={"choices": list(VARIANTS)}, calib_method={"choices": CALIB_METHODS},
                       split={"metavar": "FILE"})
    search = p.add_argument_group("compression search (--search)",
                                  "per-block pruning sensitivity, then the widths that lose least under the budget; "
                                  "the winner and the uniform cut at the same budget are each built as a study "
                                  "under --out (searched/, uniform/), with search.json")
    search.add_argument("--search", action="store_true", help="search the pruned widths instead of --prune-ratio")
    add_config_options(search, SearchConfig, first=())
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.cli._config import config_from_args
    from nodulekit.optimize.study import StudyConfig, run_study
    from nodulekit.report.render import render_report

    if args.search:
        return _search(args)
    report = run_study(args.seg, args.data, args.out, config_from_args(StudyConfig, args))
    render_report(args.out)
    for row in report["variants"]:
        print(_row_line(row, 12) + ("" if "error" in row else f"  {row['artifact']}"))
    print(f"report: {args.out}/REPORT.md")
    return 1 if all("error" in r for r in report["variants"]) else 0


def _search(args) -> int:
    from nodulekit.cli._config import config_from_args
    from nodulekit.optimize.search import SearchConfig, run_search
    from nodulekit.optimize.study import StudyConfig

    doc = run_search(args.seg, args.data, args.out, config_from_args(StudyConfig, args),
                     config_from_args(SearchConfig, args))
    print(f"budget {doc['budget_kib']:.2f} KiB (baseline {doc['baseline_memory_kib']:.2f} KiB, estimated)")
    for name, pick in doc["picks"].items():
        if pick is None:
            print(f"{name:<9} nothing fits the budget")
            continue
        print(f"{name:<9} widths {pick['choice']}  estimated {pick['memory_kib']:.2f} KiB, "
              f"{pick['macs_speedup']:.2f}x fewer MACs  ratio {pick['prune_ratio']}  "
              f"proxy AP {pick['proxy']['ap']:.3f}" + ("" if pick.get("built", True) else "  (not built)"))
        for row in doc["studies"].get(name, {}).get("rows", []):
            print("  " + _row_line(row, 11))
    print(f"search: {args.out}/search.json  ({doc['timings_s']['total']:.0f} s)")
    return 0 if any(doc["picks"].values()) else 1


def _row_line(row: dict, width: int) -> str:
    """One variant row as the summary prints it."""
    if "error" in row:
        return f"{row['name']:<{width}} ERROR {row['error']}"
    return (f"{row['name']:<{width}} {row['weight_memory_kib']:9.2f} KiB  {row.get('latency_us') or 0:10.0f} us  "
            f"recall {100 * (row.get('recall') or 0):5.1f}%")
