"""``nodulekit report DIR``: re-render REPORT.md, REPORT.zh.md and the plots from DIR/report.json.

With ``--readme FILE`` it instead rewrites FILE's generated results block (between
``<!-- results:start -->`` and ``<!-- results:end -->``) from the report, leaving the rest of FILE as it is.
"""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("report", help="re-render a study's Markdown reports and plots from report.json")
    p.add_argument("study_dir", help="folder holding report.json (with --readme: that folder or the report.json)")
    p.add_argument("--readme", metavar="FILE", default=None,
                   help="instead of the reports, rewrite FILE's results block (e.g. README.md) from report.json")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.readme:
        from nodulekit.report.readme import update_readme

        print(f"readme: {update_readme(args.readme, args.study_dir)}")
        return 0
    from nodulekit.report.render import render_report

    for key, path in render_report(args.study_dir).items():
        print(f"{key}: {path}")
    return 0
