"""World <-> voxel transforms against SimpleITK, on made-up and real geometries."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nodulekit.data.ct import read_ct, write_ct
from nodulekit.data.geometry import voxel_to_world, world_to_voxel
from nodulekit.data.volume import CTVolume


def rotation(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def sitk_geometry(origin, spacing, direction) -> sitk.Image:
    """An image carrying only a geometry: SimpleITK's transforms do not depend on its size."""
    img = sitk.Image([2, 2, 2], sitk.sitkInt16)
    img.SetOrigin(tuple(origin))
    img.SetSpacing(tuple(spacing))
    img.SetDirection(tuple(np.asarray(direction, dtype=np.float64).reshape(-1)))
    return img


def header_geometry(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # geometry only, the pixels stay on disk
    return reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection()


def dicom_geometry(folder):
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    first = header_geometry(names[0])
    second = header_geometry(names[1])
    spacing = (first[1][0], first[1][1], float(np.linalg.norm(np.subtract(second[0], first[0]))))
    return first[0], spacing, first[2]


def check_against_sitk(origin, spacing, direction, rng):
    img = sitk_geometry(origin, spacing, direction)
    irc = rng.uniform(-5, 60, size=(20, 3))
    xyz = voxel_to_world(irc, origin, spacing, direction)
    for p_irc, p_xyz in zip(irc, xyz):
        ref = img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in p_irc[::-1]))
        np.testing.assert_allclose(p_xyz, ref, atol=1e-6)
        back = img.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in p_xyz))
        np.testing.assert_allclose(world_to_voxel(p_xyz, origin, spacing, direction), back[::-1], atol=1e-6)


OBLIQUE = rotation((1, 2, 3), 27.0)
LUNA_FLIPPED = np.diag([-1.0, -1.0, 1.0])  # TransformMatrix = -1 0 0 0 -1 0 0 0 1, as in some LUNA16 scans
CASES = {
    "identity": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), np.eye(3)),
    "luna": ((-195.0, -195.0, -378.0), (0.76, 0.76, 2.5), np.eye(3)),
    "luna_flipped": ((180.2, 210.5, -340.0), (0.7, 0.7, 1.25), LUNA_FLIPPED),
    "z_flipped": ((10.0, -5.0, 100.0), (0.6, 0.6, 1.0), np.diag([1.0, 1.0, -1.0])),
    "oblique": ((12.5, -40.0, 7.0), (0.8, 0.9, 2.0), OBLIQUE),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(name):
    origin, spacing, direction = CASES[name]
    irc = np.random.default_rng(0).uniform(-10, 500, size=(100, 3))
    xyz = voxel_to_world(irc, origin, spacing, direction)
    np.testing.assert_allclose(world_to_voxel(xyz, origin, spacing, direction), irc, atol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_sitk(name):
    check_against_sitk(*CASES[name], np.random.default_rng(1))


def test_single_point_shape():
    origin, spacing, direction = CASES["oblique"]
    assert voxel_to_world([1, 2, 3], origin, spacing, direction).shape == (3,)
    assert world_to_voxel(np.zeros((4, 3)), origin, spacing, direction).shape == (4, 3)


def test_axis_order():
    # index (i, r, c) = (z, y, x): moving one column moves x by the x spacing
    origin, spacing = (1.0, 2.0, 3.0), (0.5, 0.7, 2.5)
    np.testing.assert_allclose(voxel_to_world([0, 0, 1], origin, spacing, np.eye(3)), (1.5, 2.0, 3.0))
    np.testing.assert_allclose(voxel_to_world([1, 0, 0], origin, spacing, np.eye(3)), (1.0, 2.0, 5.5))


def test_cptac_header_matches_sitk(cptac_mhd):
    check_against_sitk(*header_geometry(cptac_mhd), np.random.default_rng(2))


def test_lidc_dicom_matches_sitk(lidc_dicom):
    origin, spacing, direction = dicom_geometry(lidc_dicom)
    assert spacing == pytest.approx((0.681641, 0.681641, 1.25), abs=1e-5)
    check_against_sitk(origin, spacing, direction, np.random.default_rng(3))
    ct = read_ct(lidc_dicom)
    np.testing.assert_allclose(ct.origin, origin, atol=1e-4)
    np.testing.assert_allclose(ct.spacing, spacing, atol=1e-4)
    # the 12 files are named by their z in mm: slice k of the volume sits at the k-th z
    zs = sorted(float(p.stem) for p in lidc_dicom.glob("*.dcm"))
    np.testing.assert_allclose(ct.voxel_to_world(np.c_[np.arange(12), np.zeros(12), np.zeros(12)])[:, 2], zs,
                               atol=1e-4)


@pytest.mark.parametrize("name", ["luna_flipped", "oblique"])
def test_volume_methods_after_reading(tmp_path, name):
    origin, spacing, direction = CASES[name]
    hu = np.zeros((6, 10, 12), np.int16)
    hu[4, 7, 3] = 500
    path = write_ct(CTVolume(hu, origin, spacing, direction), tmp_path / "v.mhd")
    ct = read_ct(path)
    np.testing.assert_allclose(ct.direction, direction, atol=1e-6)
    img = sitk.ReadImage(str(path))
    xyz = img.TransformIndexToPhysicalPoint((3, 7, 4))
    np.testing.assert_allclose(ct.voxel_to_world([4, 7, 3]), xyz, atol=1e-4)
    irc = np.rint(ct.world_to_voxel(xyz)).astype(int)
    assert ct.hu[tuple(irc)] == 500
