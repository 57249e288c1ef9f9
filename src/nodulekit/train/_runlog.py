"""Run-folder bookkeeping shared by the trainers: CSV log, TensorBoard, RNG state."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from nodulekit.io import atomic_write


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rewrite the whole log atomically from the run history (a resumed run stays consistent)."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields and np.isscalar(row[k])]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


class TensorBoard:
    """A SummaryWriter under ``RUN/tb`` that does nothing when ``out_dir`` is None."""

    def __init__(self, out_dir: str | Path | None):
        self.writer = None
        if out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / "tb"))

    def scalars(self, row: dict, step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "epoch":
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def image(self, tag: str, img_hwc: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, img_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict | None) -> None:
    if state and "torch" in state:
        torch.set_rng_state(state["torch"])


def clean_row(row: dict) -> dict:
    """Plain Python floats and ints (checkpoints are read with ``weights_only=True``)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        out[k] = v
    return out
