"""The run settings every training shares, declared once.

:class:`RunConfig` holds what the segmentation training, the classifier training and the
compression study's fine-tuning all have (seed, held-out scans, batches, threads, validation
interval); :class:`TrainConfig` adds what a training run from a dataset folder has.
``SegTrainConfig`` (:mod:`nodulekit.train.seg`), ``ClsTrainConfig`` (:mod:`nodulekit.train.cls`)
and ``StudyConfig`` (:mod:`nodulekit.optimize.study`) derive from them.

Each field is declared with :func:`setting`, whose help text documents it here and in the CLI:
``nodulekit train`` and ``nodulekit optimize`` build their options from the fields
(:mod:`nodulekit.cli._config`), so an option and its default cannot drift from the API's. A
subclass that only changes a default redeclares the field with a plain value; the help of the
class that declared it still applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nodulekit import VAL_FRACTION

# value checks a setting can name; the CLI refuses values outside them
POSITIVE = "positive"  # > 0
FRACTION = "fraction"  # in [0, 1)
SHARE = "share"  # in [0, 1]
CHECKS = (POSITIVE, FRACTION, SHARE)


def setting(default: Any, help: str, *, check: str | None = None, choices: tuple | None = None,
            zero_is_none: bool = False) -> Any:
    """A dataclass field with its documentation.

    Args:
        default: the default value.
        help: what the setting does (the CLI option's help).
        check: one of :data:`CHECKS`; integers are otherwise checked to be non-negative.
        choices: the values allowed.
        zero_is_none: the CLI's value 0 stands for ``None`` (off, or all).
    """
    if check is not None and check not in CHECKS:
        raise ValueError(f"unknown check {check!r}, expected one of {CHECKS}")
    return field(default=default, metadata={"help": help, "check": check, "choices": choices,
                                                  "zero_is_none": zero_is_none})


@dataclass
class RunConfig:
    """Settings of every training run: the segmentation's, the classifier's and the compression
    study's fine-tuning."""

    seed: int = setting(0, "seed of sampling, augmentation and initialisation")
    val_fraction: float = setting(VAL_FRACTION, "share of scans held out for validation, picked by seriesuid hash "
                                                "(ignored with --split)", check=FRACTION)
    split: str | None = setting(None, "split.json ({'train': [...], 'val': [...]} seriesuids) that fixes the "
                                      "held-out scans, as written by nodulekit.data.split.write_split; default: "
                                      "derived from val_fraction")
    batch_size: int = setting(16, "crops per step (per process under DDP)", check=POSITIVE)
    workers: int = setting(0, "DataLoader worker processes (0 loads in the training process)")
    threads: int | None = setting(None, "CPU threads; unset: all cores, shared among the local processes",
                                  check=POSITIVE)
    val_every: int = setting(1, "validate every this many epochs (and after the last)", check=POSITIVE)
    progress: bool = setting(True, "progress bars")


@dataclass
class TrainConfig(RunConfig):
    """Settings of a training run on a dataset folder; the subclasses add ``out``,
    ``steps_per_epoch`` and ``lr`` with their own defaults."""

    data: str = setting("", "dataset folder in LUNA16 layout (subset*/, annotations.csv, candidates.csv)")
    epochs: int = setting(10, "training epochs, each followed by validation (see val_every)", check=POSITIVE)
    augment: bool = setting(True, "random flips, shifts, scale, rotation and noise on the training crops")
    resume: bool = setting(False, "continue the run in the run folder from its last checkpoint")
    init: str | None = setting(None, "start from the weights of this checkpoint (of the same kind of model)")
    cache_dir: str | None = setting(None, "VolumeCache folder (default: DATA/.cache)")
    device: str | None = setting(None, "torch device (default: cuda when available)", choices=("cpu", "cuda"))
