"""The classifier's crops for many candidates at once, as :func:`nodulekit.data.crops.cls_crop`
cuts them one by one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nodulekit.data.crops import channel_spacings, cls_input


def cls_crops(hu: np.ndarray, spacing_xyz: Sequence[float], centers_irc, shape,
              crop_spacing: Sequence[float] | None = None, context: float | None = None) -> np.ndarray:
    """``(N, C, *shape)`` float32 classifier inputs around ``centers_irc`` (see
    :func:`nodulekit.data.crops.cls_input`; C = 2 with ``context``)."""
    out = np.empty((len(centers_irc), len(channel_spacings(crop_spacing, context)), *shape), dtype=np.float32)
    for i, c in enumerate(centers_irc):
        out[i] = cls_input(hu, spacing_xyz, c, shape, crop_spacing, context)
    return out
