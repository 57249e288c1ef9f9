"""``nodulekit export``: one segmentation checkpoint to one or more deployment formats."""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.deploy.export import FORMATS

    p = sub.add_parser("export", help="export a segmentation checkpoint (onnx, onnx-int8, torchscript, rknn)",
                       description="Export a segmentation checkpoint; onnx-int8 and rknn need --data for "
                                   "calibration slices.")
    p.add_argument("checkpoint", help="segmentation checkpoint")
    p.add_argument("--format", "-f", nargs="+", choices=list(FORMATS), default=["onnx"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--static", action="store_true", help="fixed 1x7x512x512 input instead of dynamic")
    p.add_argument("--data", help="dataset folder for calibration slices (onnx-int8)")
    p.add_argument("--calib-slices", type=int, default=64)
    p.add_argument("--calib-method", default="percentile", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--variant", default="baseline", help="variant name kept in the metadata")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from nodulekit.deploy.export import export
    from nodulekit.errors import InputError

    common = {} if not args.static else {"dynamic": False}
    for fmt in args.format:
        kwargs = dict(common) if fmt in ("onnx", "onnx-int8") else {}
        if fmt == "onnx-int8":
            if not args.data:
                raise InputError(args.checkpoint, "onnx-int8 needs --data for calibration slices")
            from nodulekit.data.luna import find_series
            from nodulekit.data.seg_dataset import load_seg_scans
            from nodulekit.data.split import train_val_split
            from nodulekit.optimize.quantize import SliceReader, calibration_items

            train_uids, _ = train_val_split(sorted(find_series(args.data)))
            scans = load_seg_scans(args.data, train_uids, progress=False)
            kwargs.update(calibration=SliceReader(calibration_items(scans, args.calib_slices), scans),
                          method=args.calib_method)
        art = export(args.checkpoint, fmt, args.out, variant=args.variant, **kwargs)
        print(json.dumps(art.to_dict()))
    return 0
