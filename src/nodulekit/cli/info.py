"""``nodulekit info CT...``: read CT scans and print their geometry and HU range."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("info", help="read CT scans and print geometry and HU statistics",
                       description="Read CT scans (.mhd, .nii/.nii.gz, DICOM folders, folders of scans "
                                   "such as LUNA16 subsets) and print one line each.")
    p.add_argument("inputs", nargs="+", help="CT files, DICOM folders or folders of scans")
    p.add_argument("--min-slices", type=int, default=1, help="reject scans with fewer slices")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.data.ct import iter_ct_inputs
    from nodulekit.errors import InputError

    failures = total = 0
    for _, ct in iter_ct_inputs(args.inputs, min_slices=args.min_slices):
        total += 1
        if isinstance(ct, InputError):
            print(f"SKIP {ct}")
            failures += 1
            continue
        hu = ct.hu
        print(
            f"{ct.seriesuid}  shape(z,y,x)={ct.shape}  spacing(x,y,z)={tuple(round(s, 3) for s in ct.spacing)}  "
            f"origin={tuple(round(o, 1) for o in ct.origin)}  HU[{hu.min():.0f}, {hu.max():.0f}]"
        )
    return 1 if failures and failures == total else 0
