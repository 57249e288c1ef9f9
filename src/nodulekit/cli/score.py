"""``nodulekit score STUDY``: each variant of a compression study run end to end (detection with its
deployed file in its runtime, one classifier behind all) and scored with LUNA16 FROC on sets of
scans; the figures go into the study's report.json (``froc`` per variant) and its reports."""

from __future__ import annotations


def _scan_set(text: str):
    import argparse

    from nodulekit.optimize.end_to_end import ScanSet

    try:
        return ScanSet.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub):
    from nodulekit.cli._config import number_type
    from nodulekit.train.config import POSITIVE

    p = sub.add_parser("score", help="CPM of every variant of a compression study, end to end",
                       description="Run detection with each variant's deployed file in its runtime and the same "
                                   "classifier, score it with LUNA16 FROC on each set of scans, and write CPM (95%% "
                                   "CI), CPM change, nodules found and false positives per scan at the classifier's "
                                   "threshold, candidates and seconds per scan into the study's report.json "
                                   "(a 'froc' object per variant); the reports lead with CPM.")
    p.add_argument("study_dir", help="study folder (nodulekit optimize --out, e.g. runs/demo/optimize)")
    p.add_argument("--cls", required=True, help="classifier every variant's candidates go through (.pt, .onnx, .xml)")
    p.add_argument("--set", dest="sets", action="append", required=True, type=_scan_set, metavar="NAME=DIR[@SPLIT]",
                   help="a set of scans: a LUNA16-layout folder, narrowed to the held-out scans of a split.json "
                        "after @ (repeat the option; the report leads with 'independent', else 'held_out')")
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: every deployed one)")
    p.add_argument("--backend", default="onnx", choices=("onnx", "openvino", "auto"),
                   help="runtime of the deployed segmentation files (default: onnx, ONNX Runtime, the runtime of "
                        "the study's other columns)")
    p.add_argument("--cls-backend", default="auto", choices=("torch", "onnx", "openvino", "auto"),
                   help="runtime of the classifier (default: auto, the fastest installed)")
    p.add_argument("--threads", type=number_type(int, POSITIVE), default=2, help="CPU threads of the runtimes")
    p.add_argument("--also", action="append", default=[], metavar="DIR",
                   help="another report folder (the demo's runs/demo/report) whose variant rows get the same "
                        "figures and whose reports are re-rendered")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.optimize.end_to_end import score_study
    from nodulekit.report.plots import primary_set

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    report = score_study(args.study_dir, args.cls, args.sets, variants=variants, backend=args.backend,
                         cls_backend=args.cls_backend, threads=args.threads, also=args.also)
    rows = [r for r in report["variants"] if r.get("froc")]
    lead = primary_set(rows)
    print(f"{'variant':<12} {'set':<12} {'CPM':>6} {'change':>7} {'found':>7} {'FP/scan':>8} {'cand/scan':>9} "
          f"{'s/scan':>7}  runtime")
    for r in rows:
        for name, f in sorted(r["froc"].items(), key=lambda kv: kv[0] != lead):
            cell = lambda key, spec: "n/a" if f.get(key) is None else format(f[key], spec)  # noqa: E731
            print(f"{r['name']:<12} {name:<12} {cell('cpm', '.3f'):>6} {cell('cpm_change', '+.3f'):>7} "
                  f"{cell('nodules_found', 'd'):>3}/{f['n_nodules']:<3} {cell('fps_per_scan', '.1f'):>8} "
                  f"{cell('candidates_per_scan', '.0f'):>9} {cell('seconds_per_scan', '.1f'):>7}  {f['runtime']}")
    print(f"report: {args.study_dir}/REPORT.md")
    return 0
