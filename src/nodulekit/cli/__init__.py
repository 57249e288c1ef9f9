"""``nodulekit <command>``: a thin layer over the Python API.

Each command lives in its own module here with two functions: ``add_parser(subparsers)`` declares
its arguments, and ``run(args)`` calls one API function. Heavy imports stay inside ``run`` so that
``nodulekit --help`` is fast. A command whose settings are a dataclass (``train``, ``optimize``)
builds its options from the dataclass's fields (:mod:`nodulekit.cli._config`).

Whatever goes wrong ends in one line on stderr: ``nodulekit <command>: error: <file>: <problem>``
for bad input (:class:`~nodulekit.errors.NodulekitError`) and for the operating system's refusals
(a full or read-only disk: ``OSError`` names the path), one line for a bad option, and one
``internal error`` line for anything unforeseen (``-v`` shows its traceback).
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
    "score": "score",
    "export": "export",
    "bench": "bench",
    "report": "report",
    "demo": "demo",
    "weights": "weights",
    "seeds": "seeds",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): the usage is a ``--help`` away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
        return _fail(args, f"error: {exc}")
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"error: {where}{exc.strerror or exc}")
    except MemoryError:
        return _fail(args, "error: out of memory")
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the last guard: one line, the traceback with -v
        if args.verbose:
            raise
        return _fail(args, f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)")
    return int(result or 0)


def _fail(args, message: str, code: int = 1) -> int:
    line = " ".join(message.split())  # one line, whatever the message holds
    print(f"nodulekit {args.command}: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
