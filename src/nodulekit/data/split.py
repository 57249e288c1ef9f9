"""Deterministic train/validation split by seriesuid (a scan never sits on both sides)."""

from __future__ import annotations

import hashlib


def train_val_split(seriesuids, val_fraction: float = 0.25) -> tuple[list[str], list[str]]:
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
