"""``nodulekit mine --data DIR --seg CKPT --out CSV``: the detector's false positives on training scans."""

from __future__ import annotations

from nodulekit import SEG_THRESHOLD, VAL_FRACTION
from nodulekit.deploy import BACKENDS


def add_parser(sub):
    from nodulekit.cli._config import number_type
    from nodulekit.train.config import FRACTION, SHARE

    p = sub.add_parser("mine", help="write the segmentation's non-nodule candidates on training scans as a table",
                       description="Run the segmentation over the training scans of a LUNA16-layout folder (the "
                                   "held-out ones of --split or --val-fraction are skipped) and write every candidate "
                                   "away from the annotated and excluded findings as a class-0 row of a candidates "
                                   "table, for `nodulekit train cls --detector-candidates`.")
    p.add_argument("--data", required=True, help="dataset folder in LUNA16 layout (subset*/, annotations.csv)")
    p.add_argument("--seg", required=True, help="segmentation checkpoint (nodulekit or dlwpt) or .onnx file")
    p.add_argument("--out", required=True, help="candidates table to write (CSV)")
    p.add_argument("--val-fraction", type=number_type(float, FRACTION), default=VAL_FRACTION,
                   help="share of scans held out, as given to `nodulekit train` (default %(default)s); 0: every scan")
    p.add_argument("--split", metavar="FILE",
                   help="split.json whose held-out scans are skipped, as given to `nodulekit train` "
                        "(default: derived from --val-fraction)")
    p.add_argument("--threshold", "--seg-threshold", dest="threshold", type=number_type(float, SHARE),
                   default=SEG_THRESHOLD,
                   help="segmentation probability from which a pixel is marked, as `nodulekit detect "
                        "--seg-threshold` (default %(default)s)")
    p.add_argument("--max-slices", type=int, help="segment only the middle N slices of each scan (default: all)")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS[:3]),
                   help="segmentation runtime, as `nodulekit detect --backend` (default: auto, the fastest "
                        "CPU runtime installed)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the runtime")
    p.add_argument("--batch-size", type=int, default=4, help="slices per segmentation call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.data.luna import find_series
    from nodulekit.data.split import resolve_split
    from nodulekit.detect.mine import mine_candidates

    uids = sorted(find_series(args.data))
    if args.split is not None or args.val_fraction > 0:
        uids = resolve_split(uids, args.val_fraction, args.split)[0]
    summary = mine_candidates(args.data, args.seg, args.out, uids=uids, backend=args.backend, threads=args.threads,
                              max_slices=args.max_slices, batch_size=args.batch_size, threshold=args.threshold,
                              progress=not args.no_progress)
    for f in summary["failed"]:
        print(f"SKIPPED {f['error']}")
    print(f"scans {summary['scans_ok']} ok, {len(summary['failed'])} skipped; candidates {summary['candidates']}, "
          f"non-nodules written {summary['negatives']}, near a finding {summary['near_findings']}; "
          f"{summary['seconds']:.0f} s -> {summary['csv']}")
    return 1 if summary["scans_ok"] == 0 else 0
