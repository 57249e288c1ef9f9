"""Deterministic train/validation split by seriesuid (a scan never sits on both sides).

A run that chains stages writes its split once (:func:`write_split`, ``split.json``) and hands that
file to every stage (:func:`load_split`), so that no stage derives the held-out scans on its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nodulekit import VAL_FRACTION
from nodulekit.errors import InputError


def train_val_split(seriesuids, val_fraction: float = VAL_FRACTION) -> tuple[list[str], list[str]]:
    """Split seriesuids into (train, val), deterministically and independent of their order.

    Each uid is ranked by a hash of itself, and the first ``round(n * val_fraction)`` (at least one
    when there are two or more scans) go to validation. Adding scans later moves few of the old ones.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    uids = sorted(set(seriesuids))
    ranked = sorted(uids, key=lambda u: hashlib.sha1(u.encode()).hexdigest())
    n_val = round(len(uids) * val_fraction)
    if val_fraction > 0 and len(uids) >= 2:
        n_val = max(1, n_val)
    val = set(ranked[:n_val])
    return [u for u in uids if u not in val], [u for u in uids if u in val]


def write_split(path: str | Path, train: list[str], val: list[str]) -> Path:
    """Write ``{"train": [...], "val": [...]}`` (sorted uids) atomically to ``path``."""
    from nodulekit.io import atomic_write_text

    if set(train) & set(val):
        raise ValueError("a scan cannot be on both sides of a split")
    doc = {"train": sorted(train), "val": sorted(val)}
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def load_split(path: str | Path) -> tuple[list[str], list[str]]:
    """Read a split written by :func:`write_split` as ``(train, val)``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        train, val = [str(u) for u in doc["train"]], [str(u) for u in doc["val"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a split file ({{'train': [...], 'val': [...]}}): {exc}") from None
    if set(train) & set(val):
        raise InputError(path, "a seriesuid is on both sides of the split")
    return train, val


def resolve_split(seriesuids, val_fraction: float = VAL_FRACTION,
                  split_file: str | Path | None = None) -> tuple[list[str], list[str]]:
    """``(train, val)`` of ``seriesuids``: from ``split_file`` when one is given (uids it does not
    list are left out), else by :func:`train_val_split`."""
    if split_file is None:
        return train_val_split(seriesuids, val_fraction)
    train, val = load_split(split_file)
    present = set(seriesuids)
    return [u for u in train if u in present], [u for u in val if u in present]
