"""``nodulekit optimize``: the compression study (prune, PTQ, QAT and their combinations).

The options are :class:`nodulekit.optimize.study.StudyConfig`'s fields; an option left out keeps
its default.
"""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.cli._config import add_config_options
    from nodulekit.deploy.ptq import CALIB_METHODS
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
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.cli._config import config_from_args
    from nodulekit.optimize.study import StudyConfig, run_study
    from nodulekit.report.render import render_report

    report = run_study(args.seg, args.data, args.out, config_from_args(StudyConfig, args))
    render_report(args.out)
    for row in report["variants"]:
        if "error" in row:
            print(f"{row['name']:<12} ERROR {row['error']}")
        else:
            print(f"{row['name']:<12} {row['weight_memory_kib']:9.2f} KiB  {row['latency_us'] or 0:10.0f} us  "
                  f"recall {100 * (row['recall'] or 0):5.1f}%  {row['artifact']}")
    print(f"report: {args.out}/REPORT.md")
    return 1 if all("error" in r for r in report["variants"]) else 0
