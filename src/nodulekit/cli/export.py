"""``nodulekit export``: a segmentation or classifier checkpoint to one or more deployment formats."""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.cli._config import number_type, output_folder
    from nodulekit.deploy.export import FORMAT_NAMES
    from nodulekit.deploy.ptq import CALIB_METHODS, CALIB_SLICES
    from nodulekit.train.config import POSITIVE

    p = sub.add_parser("export", help="export a segmentation or classifier checkpoint (onnx, onnx-int8, "
                                      "torchscript, rknn, rknn-int8, openvino, openvino-int8)",
                       description="Export a checkpoint; the int8 formats need --data for calibration inputs "
                                   "(training slices for the segmentation U-Net, held-out crops for the "
                                   "classifier).")
    p.add_argument("checkpoint", help="segmentation or classifier checkpoint")
    p.add_argument("--kind", choices=("seg", "cls"), help="model kind (default: read from the checkpoint)")
    p.add_argument("--format", "-f", nargs="+", choices=FORMAT_NAMES, default=["onnx"])
    p.add_argument("--out", required=True, type=output_folder, help="output folder")
    p.add_argument("--static", action="store_true", help="seg: fixed 1x7x512x512 input instead of dynamic")
    p.add_argument("--data", help="dataset folder for calibration inputs (onnx-int8, rknn-int8, openvino-int8)")
    p.add_argument("--calib-slices", type=number_type(int, POSITIVE), default=CALIB_SLICES, help="seg: calibration slices")
    p.add_argument("--calib-method", default="percentile", choices=CALIB_METHODS, help="seg: ORT calibration")
    p.add_argument("--no-conv2d", action="store_true",
                   help="cls: onnx-int8 and rknn of the 3D model instead of its Conv2d rewrite")
    p.add_argument("--variant", default="baseline", help="variant name kept in the metadata")
    p.add_argument("--target", default="rk3588", help="RKNN target platform (rk3588 also covers the RK3588S)")
    p.add_argument("--rknn-dtype", default="fp16", choices=("fp16", "int8"),
                   help="-f rknn: fp16 build, or int8 quantized by rknn-toolkit2 (as -f rknn-int8)")
    p.add_argument("--rknn-algorithm", default="normal", choices=("normal", "mmse", "kl_divergence"),
                   help="rknn-toolkit2 quantization algorithm of the int8 builds")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from nodulekit.deploy.export import export, format_of, model_kind
    from nodulekit.errors import InputError
    from nodulekit.models.checkpoint import load_cls_model, load_seg_model

    kind = args.kind or model_kind(args.checkpoint)
    model, _ = (load_cls_model if kind == "cls" else load_seg_model)(args.checkpoint)
    formats = ["rknn-int8" if f == "rknn" and args.rknn_dtype == "int8" else f for f in args.format]
    for fmt in formats:
        try:  # a combination the table lacks fails before any export
            format_of(kind, fmt)
        except ValueError as exc:
            raise InputError(args.checkpoint, str(exc)) from None
    calibrations: dict[str, object] = {}
    for fmt in formats:
        out = Path(args.out)
        if kind == "cls":
            # the OpenVINO IR is of the 3D model: the CPU plugin runs Conv3d, no rewrite needed
            kwargs = {} if fmt in ("onnx", "openvino", "openvino-int8") else {"conv2d": not args.no_conv2d}
            form = "2d" if kwargs.get("conv2d") else "3d"
            out = out / f"cls{form}{format_of(kind, fmt).suffix}"
        else:
            kwargs = {"dynamic": False} if args.static and fmt in ("onnx", "onnx-int8") else {}
        if fmt.startswith("rknn"):
            kwargs.update(algorithm=args.rknn_algorithm, target=args.target)
        if fmt in ("onnx-int8", "rknn-int8", "openvino-int8"):
            # the classifier's crops serve every int8 build; ONNX Runtime's and NNCF's PTQ read the
            # same calibration slices
            key = kind if kind == "cls" else ("onnx-int8" if fmt == "openvino-int8" else fmt)
            if key not in calibrations:
                calibrations[key] = _calibration(args, kind, model, fmt)
            kwargs["dataset" if fmt == "rknn-int8" else "calibration"] = calibrations[key]
            if kind == "seg" and fmt == "onnx-int8":
                kwargs["method"] = args.calib_method
        art = export(model, fmt, out, kind=kind, variant=args.variant, **kwargs)
        print(json.dumps(art.to_dict(), default=str))
    return 0


def _calibration(args, kind: str, model, fmt: str):
    """Calibration inputs from ``--data``: the segmentation training scans' slices (nodule slices
    first), or the classifier's held-out crops (as the classifier study calibrates)."""
    from nodulekit.errors import InputError

    if not args.data:
        raise InputError(args.checkpoint, f"{fmt} quantization needs --data for calibration inputs")
    if kind == "cls":
        from nodulekit.optimize.classifier import calibration_crops, held_out_crops

        return calibration_crops(held_out_crops(args.data, model.crop_spacing, context=model.context)[0])
    from nodulekit.data.luna import find_series
    from nodulekit.data.seg_dataset import load_seg_scans
    from nodulekit.data.split import train_val_split
    from nodulekit.deploy.export import DEPLOY_SHAPE
    from nodulekit.deploy.ptq import SliceReader, calibration_items

    train_uids, _ = train_val_split(sorted(find_series(args.data)))
    scans = load_seg_scans(args.data, train_uids, progress=False)
    reader = SliceReader(calibration_items(scans, args.calib_slices), scans)
    if fmt in ("onnx-int8", "openvino-int8"):
        return reader
    slices = [item[reader.input_name] for item in iter(reader.get_next, None)]
    if tuple(slices[0].shape) != tuple(DEPLOY_SHAPE):
        raise InputError(args.data, f"rknn int8 calibration needs slices of the deployed input "
                                    f"{tuple(DEPLOY_SHAPE)}, these are {tuple(slices[0].shape)}")
    return slices
