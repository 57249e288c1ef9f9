"""``nodulekit demo``: the whole product on the synthetic default dataset."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a synthetic LUNA16-format dataset",
        description=(
            "Generate a synthetic dataset, train the segmentation and classifier models, build the six "
            "compression variants (and RKNN builds when .venv-rknn exists), detect nodules on held-out "
            "scans, score them with FROC, and write the report. Everything goes under --out."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a small run (a few minutes) that touches every stage")
    p.add_argument("--scans", type=int, default=None,
                   help="number of synthetic scans (default 20, 3 of them held out; quick: 6, 2 held out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and training (default 0)")
    p.add_argument("--no-rknn", action="store_true", help="skip the RKNN builds even when .venv-rknn exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.demo import DemoConfig, run_demo

    cfg = DemoConfig.for_mode(quick=args.quick, out=args.out, seed=args.seed, scans=args.scans,
                              rknn=not args.no_rknn)
    run_demo(cfg)
    return 0
