"""``nodulekit bench ARTIFACT...``: interleaved latency of exported files on this CPU;
``nodulekit bench --scan CT --seg CKPT --cls CKPT``: whole-scan detection per stage over runtimes."""

from __future__ import annotations


HELP = "median latency of .onnx / .ts / .xml files, or of whole-scan detection (--scan), measured interleaved"
DESCRIPTION = ("Time each artifact on one 1x7xSxS input, round-robin over artifacts; or, with --scan, run "
               "detection on one scan with torch, ONNX Runtime and OpenVINO (fp32 and int8), round-robin, and "
               "print the seconds of each stage.")


def add_parser(sub):
    from nodulekit.cli._config import add_cls_threshold, number_type
    from nodulekit.train.config import POSITIVE

    p = sub.add_parser("bench", help=HELP, description=DESCRIPTION)
    p.add_argument("artifacts", nargs="*", help=".onnx, .ts or .xml files")
    p.add_argument("--runs", type=number_type(int, POSITIVE), default=20, help="timed runs per artifact")
    p.add_argument("--warmup", type=number_type(int), default=3, help="untimed runs first")
    p.add_argument("--threads", type=number_type(int, POSITIVE), default=2)
    p.add_argument("--size", type=number_type(int, POSITIVE), default=512, help="slice side (default %(default)s)")
    p.add_argument("--json", help="also write the rows to this file")
    g = p.add_argument_group("scan benchmark")
    g.add_argument("--scan", help="a CT scan: benchmark whole-scan detection on it")
    g.add_argument("--seg", help="segmentation checkpoint (--scan)")
    g.add_argument("--cls", help="classifier checkpoint (--scan)")
    g.add_argument("--variant", action="append", default=[], metavar="NAME=FILE",
                   help="another segmentation model, e.g. pruned=runs/x/pruned.pt or "
                        "pruned_qat=runs/x/pruned_qat.int8.onnx (repeatable)")
    g.add_argument("--rows", nargs="+", metavar="ROW",
                   help="only these rows (torch, onnxruntime, openvino; fp32, int8), e.g. 'openvino fp32'")
    g.add_argument("--repeats", type=number_type(int, POSITIVE), default=2, help="runs of each row (default %(default)s)")
    add_cls_threshold(g, "--scan: classifier probability of a drawn nodule")
    g.add_argument("--max-png", type=number_type(int), default=None, help="draw at most N nodules per run")
    g.add_argument("--work", help="keep the exported files in this folder")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    if args.scan:
        return _run_scan(args)
    if not args.artifacts:
        raise SystemExit("nodulekit bench: give artifacts, or --scan CT --seg CKPT --cls CKPT")

    from nodulekit import SEG_CHANNELS
    from nodulekit.deploy.bench import bench

    rows = bench(args.artifacts, runs=args.runs, warmup=args.warmup, threads=args.threads,
                 shape=(1, SEG_CHANNELS, args.size, args.size))
    for r in rows:
        if "error" in r:
            print(f"{r['artifact']}: ERROR {r['error']}")
        else:
            print(f"{r['artifact']}: median {r['latency_us']:,.0f} us  (p10 {r['p10_us']:,.0f}, "
                  f"p90 {r['p90_us']:,.0f}, {r['runs']} runs, {r['threads']} threads)")
    if args.json:
        from nodulekit.io import json_ready, write_output_text

        write_output_text(args.json, json.dumps(json_ready(rows), indent=2) + "\n")
    return 1 if all("error" in r for r in rows) else 0


def _run_scan(args) -> int:
    import json

    from nodulekit.detect.profile import ROWS, bench_scan, format_table
    from nodulekit.io import json_ready, write_output_text

    if not args.seg or not args.cls:
        raise SystemExit("nodulekit bench --scan needs --seg and --cls checkpoints")
    variants = {}
    for v in args.variant:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--variant takes NAME=FILE, got {v!r}")
        variants[name] = path
    rows = ROWS if not args.rows else tuple(r for r in ROWS if r[0] in args.rows)
    if not rows:
        raise SystemExit(f"--rows: choose from {', '.join(repr(r[0]) for r in ROWS)}")
    result = bench_scan(args.scan, args.seg, args.cls, variants=variants, rows=rows, repeats=args.repeats,
                        threads=args.threads, threshold=args.threshold, max_png=args.max_png, work_dir=args.work)
    print(format_table(result))
    if args.json:
        write_output_text(args.json, json.dumps(json_ready(result), indent=1) + "\n")
    return 0 if any("error" not in r for r in result["rows"]) else 1
