"""``nodulekit bench ARTIFACT...``: interleaved latency of exported files on this CPU."""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.cli._config import number_type
    from nodulekit.train.config import POSITIVE

    p = sub.add_parser("bench", help="median latency of .onnx / .ts files, measured interleaved",
                       description="Time each artifact on one 1x7xSxS input, round-robin over artifacts.")
    p.add_argument("artifacts", nargs="+", help=".onnx or .ts files")
    p.add_argument("--runs", type=number_type(int, POSITIVE), default=20, help="timed runs per artifact")
    p.add_argument("--warmup", type=number_type(int), default=3, help="untimed runs first")
    p.add_argument("--threads", type=number_type(int, POSITIVE), default=2)
    p.add_argument("--size", type=number_type(int, POSITIVE), default=512, help="slice side (default %(default)s)")
    p.add_argument("--json", help="also write the rows to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

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
