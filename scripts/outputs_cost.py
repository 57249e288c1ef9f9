"""Size and time of detect's extra outputs (viewer, NIfTI label map, DICOM SEG and SR) on a real scan.

The shared CPTAC scan (512x512x99, 3 mm slices) is resampled to 1 mm slices with SimpleITK
(linear), which gives a 297-slice volume; a few spherical findings stand in for detection. The
DICOM outputs need a DICOM source, so the volume is also written as a DICOM series first (not
timed).

Usage:
    python scripts/outputs_cost.py [--scan SCAN.mhd] [--z-mm 1.0] [--findings 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = (REPO.parent / "shared/data/real/CPTAC-LSCC_C3N-00247/"
        "1.3.6.1.4.1.14519.5.2.1.7085.2626.242193282649561899185427104083.mhd")


def resampled(path: Path, z_mm: float):
    import SimpleITK as sitk

    from nodulekit.data.ct import read_ct
    from nodulekit.data.volume import CTVolume

    ct = read_ct(path)
    img = sitk.GetImageFromArray(ct.hu)
    img.SetOrigin(ct.origin)
    img.SetSpacing(ct.spacing)
    img.SetDirection(tuple(np.asarray(ct.direction).reshape(-1)))
    size = list(img.GetSize())
    size[2] = int(round(size[2] * ct.spacing[2] / z_mm))
    spacing = (ct.spacing[0], ct.spacing[1], z_mm)
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                        img.GetDirection(), -1024, sitk.sitkInt16)
    return CTVolume(sitk.GetArrayFromImage(out), out.GetOrigin(), out.GetSpacing(), ct.direction,
                    seriesuid=ct.seriesuid + ".1mm", source=str(path))


def fake_findings(ct, n: int, seed: int = 0):
    """``n`` balls of 5 to 20 mm in dark (lung) voxels, as detection would report them."""
    from nodulekit.detect.candidates import Finding

    rng = np.random.default_rng(seed)
    labels = np.zeros(ct.shape, dtype=np.int32)
    lung = np.argwhere(ct.hu[:, ::8, ::8] < -700) * [1, 8, 8]
    found = []
    for k in range(n):
        z, y, x = lung[rng.integers(len(lung))]
        d = float(rng.uniform(5, 20))
        r = [d / 2 / s for s in ct.spacing[::-1]]
        box = tuple(slice(max(int(c - rr) - 1, 0), min(int(c + rr) + 2, dim))
                    for c, rr, dim in zip((z, y, x), r, ct.shape))
        zz, yy, xx = np.ogrid[box]
        ball = ((zz - z) / r[0]) ** 2 + ((yy - y) / r[1]) ** 2 + ((xx - x) / r[2]) ** 2 <= 1
        labels[box][ball] = k + 1
        irc = (float(z), float(y), float(x))
        found.append(Finding(irc, tuple(ct.voxel_to_world(irc)), d, float(ball.sum() * np.prod(ct.spacing)),
                             int(ball.sum()), box, k + 1, float(rng.uniform(0.5, 1.0))))
    return labels, sorted(found, key=lambda f: -f.probability)


def main(argv=None) -> dict:
    from nodulekit.data.ct import read_ct
    from nodulekit.detect.pacs import write_dicom, write_dicom_series, write_nifti_labels
    from nodulekit.detect.viewer import write_viewer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=Path, default=REAL)
    ap.add_argument("--z-mm", type=float, default=1.0)
    ap.add_argument("--findings", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    args = ap.parse_args(argv)

    ct = resampled(args.scan, args.z_mm)
    labels, found = fake_findings(ct, args.findings)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        times = {}
        t = time.perf_counter()
        html = write_viewer(ct, labels, found, out / "viewer" / f"{ct.seriesuid}.html")
        times["viewer"] = time.perf_counter() - t
        t = time.perf_counter()
        nii = write_nifti_labels(ct, labels, found, out / "nifti" / f"{ct.seriesuid}_labels.nii.gz")
        times["nifti"] = time.perf_counter() - t
        dcm = read_ct(write_dicom_series(ct, Path(tmp) / "series"))
        t = time.perf_counter()
        written = write_dicom(dcm, labels, found, out / "dicom")
        times["dicom_seg_sr"] = time.perf_counter() - t
        result = {
            "shape_zyx": list(ct.shape),
            "spacing_xyz": [round(v, 3) for v in ct.spacing],
            "findings": len(found),
            "viewer_mb": round(html.stat().st_size / 1e6, 2),
            "nifti_kb": round(nii.stat().st_size / 1e3, 1),
            "seg_kb": round(Path(written["dicom_seg"]).stat().st_size / 1e3, 1),
            "sr_kb": round(Path(written["dicom_sr"]).stat().st_size / 1e3, 1),
            "seconds": {k: round(v, 2) for k, v in times.items()},
        }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
