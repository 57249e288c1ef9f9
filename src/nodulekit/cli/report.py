"""``nodulekit report DIR``: re-render REPORT.md, REPORT.zh.md and the plots from DIR/report.json."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("report", help="re-render a study's Markdown reports and plots from report.json")
    p.add_argument("study_dir", help="folder holding report.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.report.render import render_report

    for key, path in render_report(args.study_dir).items():
        print(f"{key}: {path}")
    return 0
