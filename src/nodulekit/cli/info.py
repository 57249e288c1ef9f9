"""``nodulekit info CT...``: read CT scans and print their geometry and HU range."""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.cli._config import number_type
    from nodulekit.train.config import POSITIVE

    p = sub.add_parser("info", help="read CT scans and print geometry and HU statistics",
                       description="Read CT scans (.mhd, .nii/.nii.gz, DICOM folders, folders of scans "
                                   "such as LUNA16 subsets) and print one line each; a scan that cannot be "
                                   "read gets one SKIP line on stderr, and the exit status is 1.")
    p.add_argument("inputs", nargs="+", help="CT files, DICOM folders or folders of scans")
    p.add_argument("--min-slices", type=number_type(int, POSITIVE), default=1, help="reject scans with fewer slices")
    p.add_argument("--allow-external-data", action="store_true",
                   help="read a MetaImage's ElementDataFile even when it lies outside the header's folder")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from nodulekit.data.ct import iter_ct_inputs
    from nodulekit.errors import InputError

    failures = total = 0
    for _, ct in iter_ct_inputs(args.inputs, min_slices=args.min_slices, allow_external_data=args.allow_external_data):
        total += 1
        if isinstance(ct, InputError):
            print(f"SKIP {' '.join(str(ct).split())}", file=sys.stderr, flush=True)
            failures += 1
            continue
        hu = ct.hu
        print(
            f"{ct.seriesuid}  shape(z,y,x)={ct.shape}  spacing(x,y,z)={tuple(round(s, 3) for s in ct.spacing)}  "
            f"origin={tuple(round(o, 1) for o in ct.origin)}  HU[{hu.min():.0f}, {hu.max():.0f}]"
        )
    if failures and total > 1:
        print(f"{failures} of {total} scans could not be read")
    return 1 if failures else 0
