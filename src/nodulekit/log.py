"""One logger for the package, with a short prefix per stage."""

from __future__ import annotations

import logging

_ROOT = "nodulekit"


def get_logger(stage: str) -> logging.Logger:
    """Return the logger of one stage, e.g. ``get_logger("train")`` -> ``nodulekit.train``."""
    return logging.getLogger(f"{_ROOT}.{stage}")


def setup_logging(verbose: bool = False) -> None:
    """Attach a console handler once (called by the CLI, never at import time)."""
    root = logging.getLogger(_ROOT)
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # some libraries configure the root logger on import; without this every line would print twice
    root.propagate = False
