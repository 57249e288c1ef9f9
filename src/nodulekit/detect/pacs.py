"""Detection results in the formats a PACS, 3D Slicer, OHIF or ITK-SNAP opens.

- ``write_seg``: a DICOM Segmentation (binary) with one segment per reported nodule, the
  candidate's segmentation mask, referencing the source series.
- ``write_sr``: a DICOM Comprehensive 3D SR measurement report (TID 1500) with one planar ROI per
  nodule: a 3D point at its centre (world mm, in the series' frame of reference), its long-axis
  diameter and volume, its probability, and a tracking identifier shared with its SEG segment.
- ``write_nifti_labels``: a NIfTI label map on the scan's own grid, nodule ``k`` (1-based, in the
  order of ``nodules.json``) as label ``k``; the output for MetaImage and NIfTI inputs.

The DICOM objects need the source series' own headers (UIDs, patient and study), so they are made
only when the scan was read from a DICOM folder (``is_dicom_source``). ``highdicom`` is imported
inside the writers: detection without these outputs does not need it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nodulekit import __version__
from nodulekit.errors import InputError

MANUFACTURER = "nodulekit"
MODEL_NAME = "nodulekit detect"
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
MAX_SEGMENTS = 255  # one byte per voxel in the label map handed to highdicom


def is_dicom_source(ct) -> bool:
    """Whether ``ct`` was read from a DICOM series folder (its source is a folder)."""
    return bool(ct.source) and Path(ct.source).is_dir()


def nodule_label_map(labels: np.ndarray, nodules, dtype=np.uint8) -> np.ndarray:
    """A label volume with nodule ``k`` of ``nodules`` as label ``k + 1`` (its
    :attr:`~nodulekit.detect.candidates.Finding.region`, the voxels it was measured on) and 0
    elsewhere; where two overlap (blobs of one vessel tree), the voxel keeps the earlier (more
    probable) nodule."""
    if len(nodules) > np.iinfo(dtype).max:
        raise ValueError(f"{len(nodules)} nodules do not fit labels of {np.dtype(dtype).name}")
    out = np.zeros(labels.shape, dtype=dtype)
    for k, cand in enumerate(nodules):
        box, mask = cand.region
        view = out[box]
        view[mask & (view == 0)] = k + 1
    return out


def source_datasets(ct) -> list:
    """The series' DICOM headers (pixel data left out), one per slice of ``ct``, in its slice order.

    Raises:
        InputError: a slice of ``ct`` has no file in its folder, or two files claim one slice.
    """
    import pydicom

    folder = Path(ct.source)
    by_slice: dict[int, object] = {}
    uid = None
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - other files (DICOMDIR, notes) may sit beside a series
            continue
        if "ImagePositionPatient" not in ds or "SOPInstanceUID" not in ds:
            continue
        if uid is None:
            uid = ds.SeriesInstanceUID
        elif ds.SeriesInstanceUID != uid:
            continue
        k = int(round(float(ct.world_to_voxel(np.asarray(ds.ImagePositionPatient, dtype=np.float64))[0])))
        if k in by_slice:
            raise InputError(folder, f"two DICOM files give slice {k}")
        by_slice[k] = ds
    n = ct.shape[0]
    if sorted(by_slice) != list(range(n)):
        raise InputError(folder, f"the DICOM files give slices {sorted(by_slice)[:3]}... for a volume of {n}")
    return [by_slice[k] for k in range(n)]


def _algorithm():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name="nodulekit detect", version=__version__,
                                              family=codes.DCM.ArtificialIntelligence)


def write_seg(ct, labels: np.ndarray, nodules, path: str | Path, *, datasets=None,
              tracking_uids: list[str] | None = None) -> Path | None:
    """Write a binary DICOM SEG of ``nodules`` (segment ``k + 1`` = ``nodules[k]``); ``None`` and
    nothing written when there is no nodule (a SEG needs at least one segment).

    Args:
        ct: the scan, read from a DICOM folder.
        labels: its candidate label volume.
        nodules: the reported :class:`~nodulekit.detect.candidates.Finding` s, at most 255.
        path: the ``.dcm`` file to write.
        datasets: :func:`source_datasets` of ``ct`` (read when not given).
        tracking_uids: one UID per nodule, shared with the SR's tracking identifiers.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    nodules = list(nodules)[:MAX_SEGMENTS]
    if not nodules:
        return None
    datasets = source_datasets(ct) if datasets is None else datasets
    tracking_uids = tracking_uids or [hd.UID() for _ in nodules]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=f"nodule {k + 1}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(),
            tracking_uid=tracking_uids[k],
            tracking_id=f"nodule {k + 1}",
        )
        for k in range(len(nodules))
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=nodule_label_map(labels, nodules),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number="0",
        series_description="nodulekit nodules",
    )
    return _save(seg, path)


def write_sr(ct, labels: np.ndarray, nodules, path: str | Path, *, datasets=None,
             tracking_uids: list[str] | None = None) -> Path:
    """Write a Comprehensive 3D SR measurement report (TID 1500) of ``nodules``: per nodule a planar
    ROI whose region is a 3D point at its centre (world mm), with its long-axis diameter (mm), its
    volume (mm^3), its probability (unitless) and a tracking identifier ``nodule k`` (the SEG
    segment's label and UID). A scan without nodules gets one measurement group, finding type *nodule*, presence *absent*."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    nodules = list(nodules)[:MAX_SEGMENTS]
    datasets = source_datasets(ct) if datasets is None else datasets
    tracking_uids = tracking_uids or [hd.UID() for _ in nodules]
    frame_uid = datasets[0].FrameOfReferenceUID
    algorithm = hd.sr.AlgorithmIdentification(name="nodulekit detect", version=__version__)
    groups = []
    for k, cand in enumerate(nodules):
        measurements = [
            hd.sr.Measurement(name=codes.SCT.LongAxis, value=round(float(cand.long_axis_mm), 2),
                              unit=codes.UCUM.Millimeter, algorithm_id=algorithm),
            hd.sr.Measurement(name=codes.SCT.Volume, value=round(float(cand.volume_mm3), 2),
                              unit=codes.UCUM.CubicMillimeter, algorithm_id=algorithm),
            hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(cand.probability), 6),
                              unit=codes.UCUM.NoUnits, algorithm_id=algorithm),
        ]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uids[k], identifier=f"nodule {k + 1}"),
            referenced_region=hd.sr.ImageRegion3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([cand.center_xyz], dtype=np.float64),
                frame_of_reference_uid=frame_uid),
            finding_type=codes.SCT.Nodule,
            algorithm_id=algorithm,
            geometric_purpose=codes.DCM.Center,
            measurements=measurements,
        ))
    if not groups:  # TID 1500 needs one measurement group: this one says that no nodule was found
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="no nodule"),
            finding_type=codes.SCT.Nodule,
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.DCM.PresenceOfProperty,
                                                               value=codes.SCT.Absent)],
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=MODEL_NAME, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=datasets,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="nodulekit nodules",
    )
    return _save(sr, path)


def _save(ds, path: str | Path) -> Path:
    from nodulekit.io import atomic_write

    return atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def write_dicom(ct, labels: np.ndarray, nodules, out_dir: str | Path, *, seg: bool = True, sr: bool = True
                ) -> dict[str, str | None]:
    """Write ``<out_dir>/<uid>_seg.dcm`` and/or ``<uid>_sr.dcm`` with shared tracking UIDs;
    returns their paths (``None`` for one not written)."""
    import highdicom as hd

    nodules = list(nodules)[:MAX_SEGMENTS]
    datasets = source_datasets(ct)
    uids = [hd.UID() for _ in nodules]
    out_dir = Path(out_dir)
    written: dict[str, str | None] = {"dicom_seg": None, "dicom_sr": None}
    if seg:
        p = write_seg(ct, labels, nodules, out_dir / f"{ct.seriesuid}_seg.dcm", datasets=datasets,
                      tracking_uids=uids)
        written["dicom_seg"] = None if p is None else str(p)
    if sr:
        written["dicom_sr"] = str(write_sr(ct, labels, nodules, out_dir / f"{ct.seriesuid}_sr.dcm",
                                           datasets=datasets, tracking_uids=uids))
    return written


def write_nifti_labels(ct, labels: np.ndarray, nodules, path: str | Path) -> Path:
    """Write the nodules' label map (:func:`nodule_label_map`, uint16) as gzipped NIfTI with the
    scan's origin, spacing and direction: 3D Slicer and ITK-SNAP overlay it on the scan."""
    import SimpleITK as sitk

    from nodulekit.io import atomic_write

    img = sitk.GetImageFromArray(nodule_label_map(labels, list(nodules), dtype=np.uint16))
    img.SetOrigin(ct.origin)
    img.SetSpacing(ct.spacing)
    img.SetDirection(tuple(float(v) for v in np.asarray(ct.direction).reshape(-1)))

    def write(tmp: Path) -> None:
        # NiftiImageIO goes by the file name's suffix, which the temporary file lacks
        named = tmp.with_name(tmp.name + ".nii.gz")
        try:
            sitk.WriteImage(img, str(named), useCompression=True)
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)

    return atomic_write(path, write)


def write_dicom_series(ct, folder: str | Path, *, series_uid: str | None = None) -> Path:
    """Write ``ct`` as a CT DICOM series, one file per slice (``0000.dcm``...), with the geometry
    and UIDs a reader and :func:`write_seg` need: for tests and for trying the DICOM outputs on a
    MetaImage or NIfTI scan."""
    import highdicom as hd
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(ct.direction, dtype=np.float64).reshape(3, 3)
    study, series, frame = hd.UID(), series_uid or hd.UID(), hd.UID()
    hu = np.asarray(ct.hu)
    for k in range(ct.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = hd.UID()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "nodulekit^test", "nodulekit-test"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "O", "20260101", "000000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = MANUFACTURER, 1, k + 1
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(float(v), 4) for v in ct.voxel_to_world((k, 0, 0))]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(ct.spacing[1]), float(ct.spacing[0])]
        ds.SliceThickness = float(ct.spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(hu[k], dtype=np.int16).tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    return folder
