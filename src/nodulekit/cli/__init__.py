"""``nodulekit <command>``: a thin layer over the Python API.

Each command lives in its own module here with two functions: ``add_parser(subparsers)`` declares
its arguments, and ``run(args)`` calls one API function. Heavy imports stay inside ``run`` so that
``nodulekit --help`` is fast. A command whose settings are a dataclass (``train``, ``optimize``)
builds its options from the dataclass's fields (:mod:`nodulekit.cli._config`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nodulekit import __version__
from nodulekit.errors import NodulekitError

# command name -> module in nodulekit.cli (order is the order of `nodulekit --help`)
COMMANDS = {
    "synth": "synth",
    "info": "info",
    "train": "train",
    "mine": "mine",
    "detect": "detect",
    "evaluate": "evaluate",
    "optimize": "optimize",
    "export": "export",
    "bench": "bench",
    "report": "report",
    "demo": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodulekit",
        description="Lung-nodule detection for chest CT, compressed for RK3588 NPUs and CPUs.",
    )
    parser.add_argument("--version", action="version", version=f"nodulekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"nodulekit.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nodulekit.cli.{module}":
                raise
            continue  # command not available in this build
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nodulekit.log import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        result = args.func(args)
    except NodulekitError as exc:
        print(f"nodulekit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nodulekit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
