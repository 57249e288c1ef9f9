"""One logger for the package, with a short prefix per stage."""

from __future__ import annotations

import logging
import sys

_ROOT = "nodulekit"


class _StderrHandler(logging.StreamHandler):
    """A console handler that writes to whatever ``sys.stderr`` is when a record is emitted.

    ``logging.StreamHandler()`` keeps the stream it was created with. A caller that redirects
    ``sys.stderr`` (a test's capture, a notebook, a wrapper that closes its own stream) would leave
    it writing to a closed file, and every later record would print a logging error instead.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def get_logger(stage: str) -> logging.Logger:
    """Return the logger of one stage, e.g. ``get_logger("train")`` -> ``nodulekit.train``."""
    return logging.getLogger(f"{_ROOT}.{stage}")


def setup_logging(verbose: bool = False) -> None:
    """Attach a console handler once (called by the CLI, never at import time)."""
    root = logging.getLogger(_ROOT)
    if root.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # some libraries configure the root logger on import; without this every line would print twice
    root.propagate = False
