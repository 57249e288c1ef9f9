"""Command-line options built from a settings dataclass, so that a setting is declared once.

Each field of the dataclass becomes ``--field-name``: its help is the field's (see
:func:`nodulekit.train.config.setting`), its type and the values it accepts come from the
annotation and the field's ``check``, and a ``bool`` becomes a ``--name`` / ``--no-name`` pair.
An option left out stays out of the parsed namespace, so :func:`config_from_args` gives the
dataclass's own default for it: the CLI and the Python API cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path

NON_NEGATIVE = "non-negative"  # >= 0 (what an int without a check means)


def number_type(kind: type, check: str | None = None, *, low: float | None = None, high: float | None = None):
    """An argparse type converting to ``kind`` and refusing values outside ``check`` (and outside
    ``[low, high]`` when given). A float must be finite: NaN passes no comparison and would slip
    through every range."""
    from nodulekit.train.config import FRACTION, POSITIVE, SHARE

    tests = {
        POSITIVE: (lambda v: v > 0, "a positive number"),
        FRACTION: (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
        SHARE: (lambda v: 0 <= v <= 1, "a share in [0, 1]"),
        NON_NEGATIVE: (lambda v: v >= 0, "a non-negative number"),
        None: ((lambda v: v >= 0, "a non-negative integer") if kind is int else (lambda v: True, "a finite number")),
    }
    ok, wanted = tests[check]
    if low is not None or high is not None:
        lo, hi = -math.inf if low is None else low, math.inf if high is None else high
        ok = (lambda v, first=ok: first(v) and lo <= v <= hi)
        wanted = f"{'an integer' if kind is int else 'a number'} from {lo:g} to {hi:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_cls_threshold(parser, help: str) -> None:
    """``--threshold``: the classifier probability from which a candidate counts as a nodule."""
    from nodulekit import CLS_THRESHOLD
    from nodulekit.train.config import SHARE

    parser.add_argument("--threshold", type=number_type(float, SHARE), default=CLS_THRESHOLD,
                        help=f"{help} (default %(default)s)")


def output_folder(text: str) -> str:
    """An argparse type for ``--out`` folders: refuses an existing file, a path under a file and a
    folder that cannot be written, before any work is done."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not writable")
    return text


def _zero_is_none(parse):
    def wrapped(text: str):
        value = parse(text)
        return None if value == 0 else value

    wrapped.__name__ = parse.__name__
    return wrapped


def _unwrap_optional(hint) -> type:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _metadata(cls, name: str, key: str):
    """``key`` of field ``name``'s metadata, from the nearest class of ``cls``'s bases that has it
    (a subclass that only changes a default keeps the help and check of the class that declared
    the field)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and key in f.metadata:
            return f.metadata[key]
    return None


def _default_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_options(parser, cls, *, first=("data", "out"), skip=(), **overrides) -> None:
    """Add an option for each field of dataclass ``cls`` (but those in ``skip``).

    Args:
        parser: an argparse parser or argument group.
        cls: the settings dataclass.
        first: fields listed first in the help; the others follow in the dataclass's order.
        skip: fields without an option.
        overrides: per field, ``add_argument`` keywords replacing the derived ones (``required``,
            ``metavar``, ``choices`` from elsewhere, a ``type`` and ``help`` for a value with its own
            syntax on the command line).
    """
    hints = typing.get_type_hints(cls)
    ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name not in first)
    for f in ordered:
        if f.name in skip:
            continue
        kind = _unwrap_optional(hints[f.name])
        check, choices = _metadata(cls, f.name, "check"), _metadata(cls, f.name, "choices")
        kw: dict = {}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple and typing.get_args(kind)[-1] is Ellipsis:
            kw.update(nargs="+", type=typing.get_args(kind)[0])
        elif kind in (int, float):
            kw["type"] = number_type(kind, check)
            if _metadata(cls, f.name, "zero_is_none"):
                kw["type"] = _zero_is_none(kw["type"])
        elif kind is str:
            kw["type"] = str
        if choices:
            kw["choices"] = list(choices)
        kw.update(overrides.get(f.name, {}))
        text = kw.pop("help", None) or _metadata(cls, f.name, "help") or ""
        default = _default_text(f.default if f.default is not dataclasses.MISSING else None)
        if default and not kw.get("required"):
            text += f" (default: {default})"
        parser.add_argument(option_name(f.name), dest=f.name, default=argparse.SUPPRESS,
                            help=text.replace("%", "%%"), **kw)


def config_from_args(cls, args: argparse.Namespace, **given):
    """An instance of ``cls`` with the options present in ``args`` (lists as tuples) and ``given``;
    every other field keeps its default."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **given})
