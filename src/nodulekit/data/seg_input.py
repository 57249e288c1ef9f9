"""The segmentation network's input: a slice with its neighbours, the one place it is built.

Training (:meth:`nodulekit.data.seg_dataset.SegScan.context`), the compression study's calibration
and detection (:func:`nodulekit.detect.candidates.seg_batch`) all cut it here, so a model sees at
inference exactly what it was trained on.
"""

from __future__ import annotations

import numpy as np

from nodulekit import CONTEXT_SLICES, HU_MAX, HU_MIN


def seg_context(hu, z: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """``(7, h, w)`` float32 around slice ``z`` of the ``(Z, H, W)`` HU volume ``hu`` (an array or
    a memmap): ``CONTEXT_SLICES`` neighbours on each side, their indices clamped at the volume
    ends (the first and last slices repeat), HU clipped to [-1000, 1000]."""
    zs = np.clip(np.arange(z - CONTEXT_SLICES, z + CONTEXT_SLICES + 1), 0, hu.shape[0] - 1)
    block = np.asarray(hu[zs, rows, cols], dtype=np.float32)
    return np.clip(block, HU_MIN, HU_MAX, out=block)
