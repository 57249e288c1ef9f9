"""The classifier's crops for many candidates at once, as :func:`nodulekit.data.crops.cls_crop`
cuts them one by one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nodulekit.data.crops import cls_crop


def cls_crops(hu: np.ndarray, spacing_xyz: Sequence[float], centers_irc, shape,
              crop_spacing: Sequence[float] | None = None) -> np.ndarray:
    """``(N, 1, *shape)`` float32 classifier inputs around ``centers_irc`` (see
    :func:`nodulekit.data.crops.cls_crop`)."""
    out = np.empty((len(centers_irc), 1, *shape), dtype=np.float32)
    for i, c in enumerate(centers_irc):
        out[i, 0] = cls_crop(hu, spacing_xyz, c, shape, crop_spacing)
    return out
