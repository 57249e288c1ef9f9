"""What a classifier's outputs mean, whichever runtime produced them."""

from __future__ import annotations

import numpy as np


def class1_probability(out: np.ndarray) -> np.ndarray:
    """``(N,)`` nodule probability from a classifier output: ``(N, 2)`` probabilities or logits,
    or ``(N,)`` / ``(N, 1)`` probabilities; NPU-shaped ``(N, 2, 1, 1)`` outputs count as ``(N, 2)``."""
    out = np.asarray(out, dtype=np.float32)
    if out.ndim == 4 and out.shape[2:] == (1, 1):
        out = out[:, :, 0, 0]
    if out.ndim == 2 and out.shape[1] == 2:
        if np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
            return out[:, 1]
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return (e[:, 1] / e.sum(axis=1)).astype(np.float32)
    return out.reshape(out.shape[0])
