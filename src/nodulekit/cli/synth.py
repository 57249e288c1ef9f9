"""``nodulekit synth``: generate a synthetic LUNA16-format dataset of chest CT scans with nodules."""

from __future__ import annotations

EPILOG = """\
writes, under --out:
  subset0/<uid>.mhd + .raw        int16 HU volumes
  masks/<uid>.mhd + .zraw         uint16 nodule labels (k = k-th annotations.csv row of that uid)
  annotations.csv                 seriesuid,coordX,coordY,coordZ,diameter_mm (nodules 3-30 mm)
  annotations_excluded.csv        findings below 3 mm, same columns
  candidates.csv                  seriesuid,coordX,coordY,coordZ,class (nodules and look-alikes)
  seriesuids.csv, synth.json      uid list; parameters and per-scan summary

example: nodulekit synth --out data/synth --scans 40 --seed 0 --workers 2
"""


# a chest needs some pixels across, and a detector input 7 slices; 1024 is twice a CT's 512
MIN_SIZE, MAX_SIZE, MIN_SLICES = 64, 1024, 7


def add_parser(sub):
    import argparse

    from nodulekit.cli._config import number_type, output_folder
    from nodulekit.train.config import POSITIVE, SHARE

    p = sub.add_parser(
        "synth", help="generate a synthetic LUNA16-format CT dataset with nodules",
        description="Generate synthetic chest CT scans (body, lungs, vessels, airways, ribs, spine, nodules,\n"
                    "scanner blur and noise) in the LUNA16 layout. The same seed gives the same bytes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=output_folder, metavar="DIR", help="output folder")
    p.add_argument("--scans", type=number_type(int, POSITIVE), required=True, metavar="N", help="number of scans")
    p.add_argument("--seed", type=number_type(int), default=0, metavar="S", help="dataset seed (default 0)")
    p.add_argument("--size", type=number_type(int, low=MIN_SIZE, high=MAX_SIZE), default=512, metavar="PX",
                   help="in-plane voxels; below 512 the spacing grows so the field of view stays a chest (default 512)")
    p.add_argument("--max-slices", type=number_type(int, low=MIN_SLICES), default=None, metavar="N",
                   help="cap on slices per scan, keeping the middle of the lungs (default: the whole chest, <= 280)")
    p.add_argument("--hila", choices=("simple", "lobar"), default="simple",
                   help="hilar anatomy: simple (one trunk per tree) or lobar (lobar trunks branching at the hilum, "
                        "superior and inferior veins, hilar lymph nodes); default simple")
    p.add_argument("--thick-share", type=number_type(float, SHARE), default=0.0, metavar="F",
                   help="share of scans with 3 mm slices, as routine clinical CT has, beyond LUNA16's 0.625-2.5 mm "
                        "(default 0)")
    p.add_argument("--workers", type=number_type(int, POSITIVE), default=1, metavar="W",
                   help="worker processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.data.synth import generate_dataset

    s = generate_dataset(args.out, args.scans, args.seed, size=args.size, max_slices=args.max_slices,
                         workers=args.workers, progress=not args.no_progress, hila=args.hila,
                         thick_share=args.thick_share)
    ratio = s["candidates_class0"] / max(1, s["candidates_class1"])
    print(f"scans       {s['scans']}")
    print(f"nodules     {s['nodules']}  (annotations.csv)")
    print(f"excluded    {s['excluded']}  (annotations_excluded.csv, < 3 mm)")
    print(f"candidates  {s['candidates']}  (class 1: {s['candidates_class1']}, class 0: {s['candidates_class0']}, "
          f"{ratio:.0f}:1)")
    print(f"time        {s['seconds']:.1f} s ({s['seconds'] / s['scans']:.1f} s per scan)")
    print(f"written to  {s['out_dir']}")
    return 0
