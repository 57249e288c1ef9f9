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
    p.add_argument("--data", help="dataset folder for calibration slices (onnx-int8, rknn int8)")
    p.add_argument("--calib-slices", type=int, default=64)
    p.add_argument("--calib-method", default="percentile", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--variant", default="baseline", help="variant name kept in the metadata")
    p.add_argument("--target", default="rk3588", help="RKNN target platform (rk3588 also covers the RK3588S)")
    p.add_argument("--rknn-dtype", default="fp16", choices=("fp16", "int8"),
                   help="rknn: fp16 build, or int8 quantized by rknn-toolkit2 from --data slices (default fp16)")
    p.add_argument("--rknn-algorithm", default="normal", choices=("normal", "mmse", "kl_divergence"),
                   help="rknn-toolkit2 quantization algorithm for --rknn-dtype int8")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from nodulekit.deploy.export import export

    common = {} if not args.static else {"dynamic": False}
    for fmt in args.format:
        kwargs = dict(common) if fmt in ("onnx", "onnx-int8") else {}
        if fmt == "onnx-int8":
            kwargs.update(calibration=_calibration(args, fmt), method=args.calib_method)
        if fmt == "rknn":
            quantize = args.rknn_dtype == "int8"
            kwargs.update(quantize=quantize, algorithm=args.rknn_algorithm, target=args.target)
            if quantize:
                from nodulekit.deploy.export import DEPLOY_SHAPE
                from nodulekit.errors import InputError

                reader = _calibration(args, fmt)
                kwargs["dataset"] = [item[reader.input_name] for item in iter(reader.get_next, None)]
                shape = tuple(kwargs["dataset"][0].shape)
                if shape != tuple(DEPLOY_SHAPE):
                    raise InputError(args.data, f"rknn int8 calibration needs slices of the deployed input "
                                                f"{tuple(DEPLOY_SHAPE)}, these are {shape}")
        art = export(args.checkpoint, fmt, args.out, variant=args.variant, **kwargs)
        print(json.dumps(art.to_dict()))
    return 0


def _calibration(args, fmt: str):
    """Calibration slices from the training scans of ``--data`` (nodule slices first)."""
    from nodulekit.data.luna import find_series
    from nodulekit.data.seg_dataset import load_seg_scans
    from nodulekit.data.split import train_val_split
    from nodulekit.errors import InputError
    from nodulekit.optimize.quantize import SliceReader, calibration_items

    if not args.data:
        raise InputError(args.checkpoint, f"{fmt} quantization needs --data for calibration slices")
    train_uids, _ = train_val_split(sorted(find_series(args.data)))
    scans = load_seg_scans(args.data, train_uids, progress=False)
    return SliceReader(calibration_items(scans, args.calib_slices), scans)
