"""The one CT volume type every stage works with, and its world <-> voxel geometry."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CTVolume:
    """A CT scan in Hounsfield units.

    Attributes:
        hu: array in (index, row, col) = (z, y, x) order, float32 or int16, in HU.
        origin: world position (x, y, z) in mm of voxel (0, 0, 0).
        spacing: voxel size (x, y, z) in mm.
        direction: 3x3 direction cosine matrix (columns are the x, y, z voxel axes in world space),
            as SimpleITK's row-major ``GetDirection()`` reshaped to 3x3.
        seriesuid: file stem for MetaImage/NIfTI, SeriesInstanceUID for DICOM.
        source: where it was read from, for messages.
    """

    hu: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    seriesuid: str = ""
    source: str = ""

    def __post_init__(self):
        self.origin = tuple(float(v) for v in self.origin)
        self.spacing = tuple(float(v) for v in self.spacing)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def world_to_voxel(self, xyz) -> np.ndarray:
        """World (x, y, z) mm -> continuous voxel (index, row, col). Accepts (3,) or (N, 3)."""
        from nodulekit.data.geometry import world_to_voxel

        return world_to_voxel(xyz, self.origin, self.spacing, self.direction)

    def voxel_to_world(self, irc) -> np.ndarray:
        """Voxel (index, row, col) -> world (x, y, z) mm. Accepts (3,) or (N, 3)."""
        from nodulekit.data.geometry import voxel_to_world

        return voxel_to_world(irc, self.origin, self.spacing, self.direction)
