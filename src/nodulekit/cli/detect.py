"""``nodulekit detect CT... [--seg CKPT --cls CKPT] --out DIR``: find nodules in CT scans (with the
shipped weights when no model is given)."""

from __future__ import annotations

from nodulekit import SEG_THRESHOLD
from nodulekit.deploy import BACKENDS


def add_parser(sub):
    from nodulekit.cli._config import NON_NEGATIVE, add_cls_threshold, number_type, output_folder
    from nodulekit.detect.candidates import VIEW_COUNTS, VIEW_MEAN, VIEW_MEANS, VIEWS, VIEWS_FROM
    from nodulekit.train.config import POSITIVE, SHARE

    p = sub.add_parser("detect", help="detect lung nodules in CT scans (table, JSON, PNGs; viewer, DICOM SEG/SR)",
                       description="Segment the lung slices, group the segmentation into 3D candidates, classify "
                                   "a crop around each, and write nodules.csv (every candidate), nodules.json and "
                                   "a PNG per nodule above --threshold; with --html a scan viewer, with "
                                   "--dicom-seg/--dicom-sr DICOM objects a PACS takes, with --nifti a label map. "
                                   "The outputs of a run replace those of an "
                                   "earlier one together at the end; a scan that fails is reported and skipped, "
                                   "and the exit status is 1 if any failed.")
    p.add_argument("inputs", nargs="+", help=".mhd / .nii.gz files, DICOM folders or LUNA16 subset folders")
    p.add_argument("--seg", help="segmentation checkpoint (nodulekit or dlwpt) or .onnx file (default: the weights "
                                 "shipped with nodulekit, see docs/model-card.md)")
    p.add_argument("--cls", help="classifier checkpoint (nodulekit or dlwpt) or .onnx file (default: the shipped "
                                 "weights)")
    p.add_argument("--out", required=True, type=output_folder, help="output folder")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="segmentation runtime: auto (default: the fastest CPU runtime installed, OpenVINO, else "
                        "ONNX Runtime; a checkpoint is exported once to a cache), torch (checkpoint), onnx (.onnx, "
                        "ONNX Runtime on the CPU), openvino (.xml or .onnx) or rknn (.rknn on an RK3588 board "
                        "through rknn-toolkit-lite2)")
    p.add_argument("--cls-backend", default="auto", choices=("auto", *BACKENDS),
                   help="classifier runtime (as --backend)")
    p.add_argument("--cls-int8", action="store_true",
                   help="run the classifier checkpoint in int8 (OpenVINO, quantized once with NNCF on synthetic "
                        "crops and cached): faster on CPUs with VNNI, see docs/experiments.md for its accuracy")
    add_cls_threshold(p, "classifier probability of a reported nodule")
    p.add_argument("--seg-threshold", type=number_type(float, SHARE), default=SEG_THRESHOLD,
                   help="segmentation probability from which a pixel is marked (default %(default)s)")
    p.add_argument("--min-volume", type=number_type(float, NON_NEGATIVE), default=None,
                   help="smallest segmented component in mm^3 (default 7)")
    p.add_argument("--min-diameter", type=number_type(float, NON_NEGATIVE), default=None,
                   help="smallest candidate's volume-equivalent diameter in mm (default 2.7: LUNA16 counts nodules "
                        "from 3 mm)")
    p.add_argument("--views", type=int, choices=VIEW_COUNTS, default=VIEWS,
                   help="mirror images of a likely candidate's crop whose probabilities the classifier averages "
                        "(default %(default)s; 1: the plain crop only, the fastest)")
    p.add_argument("--views-from", type=number_type(float, SHARE), default=VIEWS_FROM,
                   help="classifier probability of the plain crop from which a candidate gets --views (default "
                        "%(default)s)")
    p.add_argument("--view-mean", choices=VIEW_MEANS, default=VIEW_MEAN,
                   help="how the views' probabilities are averaged (default %(default)s: the mean of their logs, "
                        "so a candidate must score high on every view)")
    p.add_argument("--batch-size", type=number_type(int, POSITIVE), default=4, help="slices per segmentation call")
    p.add_argument("--threads", type=number_type(int, POSITIVE), default=2, help="CPU threads of the runtimes")
    p.add_argument("--no-png", action="store_true", help="do not draw the nodules")
    p.add_argument("--max-png", type=number_type(int), metavar="N",
                   help="draw at most N nodules per scan, most probable first (default: all above --threshold)")
    p.add_argument("--html", action="store_true",
                   help="write viewer/<uid>.html: the scan with the candidates' outlines and a nodule table, one "
                        "self-contained file any browser opens (no network, no server)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="DICOM input: write dicom/<uid>_seg.dcm, a DICOM SEG with one segment per nodule, referencing "
                        "the series; MetaImage/NIfTI input: the NIfTI label map instead (as --nifti)")
    p.add_argument("--dicom-sr", action="store_true",
                   help="DICOM input: write dicom/<uid>_sr.dcm, a Comprehensive 3D SR measurement report (TID 1500): "
                        "per nodule its centre, long-axis diameter, volume and probability; MetaImage/NIfTI input: "
                        "the NIfTI label map instead")
    p.add_argument("--nifti", action="store_true",
                   help="write nifti/<uid>_labels.nii.gz, the nodules' label map on the scan's grid (nodule k of "
                        "nodules.json is label k), for 3D Slicer and ITK-SNAP")
    p.add_argument("--allow-external-data", action="store_true",
                   help="read a MetaImage's ElementDataFile even when it lies outside the header's folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.detect import run_detection
    from nodulekit.detect.candidates import MIN_DIAMETER_MM, MIN_VOLUME_MM3

    summary = run_detection(
        args.inputs, args.seg, args.cls, args.out,
        backend=args.backend, cls_backend=args.cls_backend, cls_int8=args.cls_int8, threshold=args.threshold,
        seg_threshold=args.seg_threshold, batch_size=args.batch_size, threads=args.threads,
        min_volume_mm3=MIN_VOLUME_MM3 if args.min_volume is None else args.min_volume,
        min_diameter_mm=MIN_DIAMETER_MM if args.min_diameter is None else args.min_diameter,
        views=args.views, views_from=args.views_from, view_mean=args.view_mean, png=not args.no_png,
        max_png=args.max_png,
        progress=False if args.no_progress else None,
        allow_external_data=args.allow_external_data, html=args.html, dicom_seg=args.dicom_seg,
        dicom_sr=args.dicom_sr, nifti=args.nifti,
    )
    if args.seg is None or args.cls is None:  # say which files stood in
        used = summary["settings"]
        print(f"models: {used['seg']} and {used['cls']}"
              + (" (shipped with nodulekit)" if args.seg is None and args.cls is None else ""))
    for f in summary["failed"]:
        print(f"FAILED {f['error']}")
    per_scan = summary["seconds_per_scan"]
    where = f"-> {summary['csv']}" if summary["written"] else f"nothing written to {args.out}"
    print(f"scans ok {summary['scans_ok']}, failed {summary['scans_failed']}; candidates {summary['n_candidates']}, "
          f"nodules >= {args.threshold} {summary['n_nodules']}; "
          f"{'-' if per_scan is None else f'{per_scan:.1f}'} s per scan {where}")
    return 1 if summary["scans_failed"] or not summary["scans_ok"] else 0
