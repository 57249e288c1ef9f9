"""``nodulekit evaluate``: LUNA16 FROC of a detections table."""

from __future__ import annotations


# the tables it reads: (option, required, what)
TABLES = (
    ("--detections", True, "seriesuid,coordX,coordY,coordZ,probability CSV"),
    ("--annotations", True, "LUNA16 annotations.csv"),
    ("--excluded", False, "annotations_excluded.csv: marks on these findings are ignored"),
    ("--seriesuids", False, "scans to evaluate, one uid per line (default: all named in the tables)"),
)


def add_parser(sub):
    from nodulekit.cli._config import add_cls_threshold, number_type, output_folder
    from nodulekit.evaluate.froc import MAX_MARKS, MAX_SENSITIVITY_LOSS, N_BOOTSTRAP
    from nodulekit.train.config import POSITIVE, SHARE

    p = sub.add_parser("evaluate", help="LUNA16 FROC (sensitivity at 1/8..8 FP per scan, CPM) of detections",
                       description="Score CAD marks (nodules.csv of `nodulekit detect`) with the LUNA16 FROC "
                                   "protocol; writes froc.json and froc.png.")
    for flag, required, what in TABLES:
        p.add_argument(flag, required=required, help=what)
    p.add_argument("--out", required=True, type=output_folder, help="output folder")
    p.add_argument("--bootstrap", type=number_type(int), default=N_BOOTSTRAP,
                   help="bootstrap samples for the 95%% CI (0: none)")
    p.add_argument("--max-marks", type=number_type(int, POSITIVE), default=MAX_MARKS,
                   help="most probable marks kept per scan")
    add_cls_threshold(p, "probability of the reported operating point")
    p.add_argument("--max-sensitivity-loss", type=number_type(float, SHARE), default=MAX_SENSITIVITY_LOSS,
                   help="also report the threshold with the fewest false positives that loses at most this much "
                        "sensitivity against every mark (default %(default)s)")
    p.add_argument("--seed", type=number_type(int), default=0, help="bootstrap seed")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.evaluate.froc import evaluate_froc

    res = evaluate_froc(args.detections, args.annotations, args.excluded, args.seriesuids, args.out,
                        n_bootstrap=args.bootstrap, seed=args.seed, max_marks=args.max_marks,
                        threshold=args.threshold, max_sensitivity_loss=args.max_sensitivity_loss)
    sens = "  ".join(f"{r:g}:{'-' if s is None else f'{s:.3f}'}"
                     for r, s in zip(res["fps_per_scan"], res["sensitivities"]))
    ci = res["cpm_ci"]
    print(f"scans {res['n_scans']}  nodules {res['n_nodules']}  detected {res['n_detected']}  "
          f"marks {res['n_detections']}  FP {res['n_false_positives']}")
    print(f"sensitivity @ FP/scan  {sens}")
    print(f"CPM {res['cpm']}" + (f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    for name, op in res["operating_points"].items():
        if op is None:
            continue
        cut = f"  ({op['fp_reduction']:.1f}x fewer FP)" if op.get("fp_reduction") else ""
        print(f"{name}: threshold {op['threshold']}  sensitivity {op['sensitivity']}  FP/scan {op['fps_per_scan']}{cut}")
    return 0
