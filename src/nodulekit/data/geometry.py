"""World (x, y, z in mm) <-> voxel (index, row, col) transforms that honour the direction matrix.

SimpleITK maps a voxel index ``(i_x, i_y, i_z)`` to ``origin + D @ (spacing * index)``. nodulekit
keeps arrays in (z, y, x) order, so the voxel triple it uses is (index, row, col) = (i_z, i_y, i_x).
"""

from __future__ import annotations

import numpy as np


def _as_rows(v) -> tuple[np.ndarray, bool]:
    arr = np.asarray(v, dtype=np.float64)
    single = arr.ndim == 1
    return arr.reshape(-1, 3), single


def voxel_to_world(irc, origin, spacing, direction) -> np.ndarray:
    """(index, row, col) -> (x, y, z) mm; accepts (3,) or (N, 3)."""
    rows, single = _as_rows(irc)
    cri = rows[:, ::-1]  # to SimpleITK's (x, y, z) index order
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    xyz = np.asarray(origin, dtype=np.float64) + (cri * np.asarray(spacing, dtype=np.float64)) @ d.T
    return xyz[0] if single else xyz


def world_to_voxel(xyz, origin, spacing, direction) -> np.ndarray:
    """(x, y, z) mm -> continuous (index, row, col); accepts (3,) or (N, 3). Round as needed."""
    rows, single = _as_rows(xyz)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    cri = np.linalg.solve(d, (rows - np.asarray(origin, dtype=np.float64)).T).T / np.asarray(
        spacing, dtype=np.float64
    )
    irc = cri[:, ::-1]
    return irc[0] if single else irc
