"""``nodulekit info CT...``: read CT scans and print their geometry and HU range."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("info", help="read CT scans and print geometry and HU statistics",
                       description="Read CT scans (.mhd, .nii/.nii.gz, DICOM folders) and print one line each.")
    p.add_argument("inputs", nargs="+", help="CT files or DICOM folders")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.data.ct import read_ct
    from nodulekit.errors import InputError

    failures = 0
    for item in args.inputs:
        try:
            ct = read_ct(item)
        except InputError as exc:
            print(f"SKIP {exc}")
            failures += 1
            continue
        hu = ct.hu
        print(
            f"{ct.seriesuid}  shape(z,y,x)={ct.shape}  spacing(x,y,z)={tuple(round(s, 3) for s in ct.spacing)}  "
            f"origin={tuple(round(o, 1) for o in ct.origin)}  HU[{hu.min():.0f}, {hu.max():.0f}]"
        )
    return 1 if failures and failures == len(args.inputs) else 0
