"""The compression variants, as data: each is a sequence of stages applied to the baseline.

The table drives the CLI choices (``nodulekit optimize --variants``), the study, the tests and the
report. Stages are functions in :mod:`nodulekit.optimize.study` taking a build and returning
one; a variant's prefix (``prune, finetune``) is computed once and shared by every variant that
starts with it.
"""

from __future__ import annotations

VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "pruned": ("prune", "finetune"),
    "ptq": ("ptq",),
    "qat": ("qat",),
    "pruned_ptq": ("prune", "finetune", "ptq"),
    "pruned_qat": ("prune", "finetune", "qat"),
}

BASELINE = "baseline"

LABELS = {
    "baseline": "Baseline (fp32)",
    "pruned": "Pruned (fp32)",
    "ptq": "PTQ int8",
    "qat": "QAT int8",
    "pruned_ptq": "Pruned + PTQ int8",
    "pruned_qat": "Pruned + QAT int8",
}


def resolve(names=None) -> list[str]:
    """Variant names in table order; the baseline is always included (ratios are taken against it).

    Raises:
        ValueError: an unknown name.
    """
    names = list(VARIANTS) if not names else list(names)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    wanted = {BASELINE, *names}
    return [n for n in VARIANTS if n in wanted]


def is_quantized(name: str) -> bool:
    return any(s in ("ptq", "qat") for s in VARIANTS[name])
