"""Scanner side of a synthetic scan: voxel grid, acquisition parameters, blur and noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

AIR_HU = -1024.0
MAX_DEFAULT_SLICES = 280  # keeps a default scan to a few seconds; thin-slice scans become partial chests


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid in world mm (identity direction), arrays in (z, y, x) order."""

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]  # (x, y, z) of voxel (0, 0, 0)
    spacing: tuple[float, float, float]  # (x, y, z)

    def axis(self, k: int) -> np.ndarray:
        """World coordinates along x (k=0), y (k=1) or z (k=2), float32."""
        n = self.shape[2 - k]
        return (self.origin[k] + self.spacing[k] * np.arange(n)).astype(np.float32)

    def crop(self, lo_xyz, hi_xyz):
        """Index slices (z, y, x) covering the world box, plus local coordinates broadcastable as (z, y, x).

        Returns ``None`` when the box misses the grid.
        """
        sl, coords = [], []
        for k in (2, 1, 0):
            n = self.shape[2 - k]
            i0 = max(0, int(np.floor((lo_xyz[k] - self.origin[k]) / self.spacing[k])))
            i1 = min(n, int(np.ceil((hi_xyz[k] - self.origin[k]) / self.spacing[k])) + 1)
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
            coords.append((self.origin[k] + self.spacing[k] * np.arange(i0, i1)).astype(np.float32))
        z, y, x = coords
        return tuple(sl), (x[None, None, :], y[None, :, None], z[:, None, None])


@dataclass(frozen=True)
class Acquisition:
    """Per-scan scanner settings."""

    size: int
    spacing: tuple[float, float, float]
    fov_mm: float
    psf_sigma_px: float  # in-plane blur of the image (reconstruction kernel)
    noise_sd: float  # HU, in the body
    noise_corr_px: float  # in-plane correlation of the noise: smaller for sharp kernels
    flip: str  # '' or the world axis ('x', 'y', 'z') stored reversed


def sample_acquisition(rng: np.random.Generator, size: int, body_width_mm: float) -> Acquisition:
    """Draw spacing, kernel and dose like the mix of scanners in LUNA16."""
    need = (body_width_mm + rng.uniform(10, 70)) / 512
    s512 = float(np.clip(need, 0.55, 0.95))
    sxy = s512 * 512 / size
    sz = float(rng.choice([0.625, 0.7, 0.8, 1.0, 1.25, 1.25, 1.5, 2.0, 2.5, 2.5]))
    sharp = rng.uniform()  # 0 soft kernel .. 1 sharp lung kernel
    flip = "" if rng.uniform() > 0.12 else str(rng.choice(["x", "y", "z"]))
    return Acquisition(
        size=size,
        spacing=(sxy, sxy, sz),
        fov_mm=sxy * size,
        psf_sigma_px=float((0.8 - 0.4 * sharp) * min(1.0, 512 / size) ** 0.5),
        noise_sd=float(rng.uniform(15, 28) + 32 * sharp**1.5),
        noise_corr_px=float((1.15 - 0.65 * sharp) * (size / 512) ** 0.5),
        flip=flip,
    )


def blur_and_noise(hu: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Apply the scanner's point spread and correlated noise in place; returns ``hu``."""
    ndi.gaussian_filter(hu, (0, acq.psf_sigma_px, acq.psf_sigma_px), output=hu, truncate=2.5)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    c = acq.noise_corr_px
    ndi.gaussian_filter(noise, (0, c, c), output=noise, truncate=2.5)
    # a Gaussian filter of white noise keeps sd 1/(2 sqrt(pi) c) in 2-D; rescale to the target sd
    noise *= np.float32(acq.noise_sd * 2.0 * np.sqrt(np.pi) * c)
    hu += noise
    return hu


def to_int16(hu: np.ndarray) -> np.ndarray:
    """Round and clip to the int16 HU range scanners write."""
    np.clip(hu, AIR_HU, 3071, out=hu)
    return np.rint(hu).astype(np.int16)


def flip_geometry(arr: np.ndarray, origin, spacing, shape_zyx, axis: str):
    """Store ``arr`` reversed along a world axis; returns (array, origin, direction) with unchanged world positions."""
    direction = np.eye(3)
    if not axis:
        return arr, tuple(origin), direction
    k = "xyz".index(axis)
    origin = list(origin)
    origin[k] += spacing[k] * (shape_zyx[2 - k] - 1)
    direction[k, k] = -1.0
    return np.ascontiguousarray(np.flip(arr, axis=2 - k)), tuple(origin), direction
