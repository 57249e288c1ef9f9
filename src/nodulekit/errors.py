"""Errors that name the file or item at fault and the problem, in one line."""

from __future__ import annotations

from pathlib import Path


class NodulekitError(Exception):
    """Base class of every error nodulekit raises on purpose."""


class InputError(NodulekitError, ValueError):
    """Bad input: a corrupt volume, a malformed table, an unknown seriesuid, a wrong checkpoint.

    ``str(err)`` is ``"<source>: <problem>"`` so that a batch job can print one line per bad item.
    """

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")
