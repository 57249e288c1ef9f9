"""Compare a synthetic scan with a real chest CT: HU histograms in lung and body, lung texture.

Usage:
    python scripts/compare_synthetic.py [--real REAL.mhd] [--synthetic SCAN.mhd | --seed S --index I]
                                        [--out docs/img/synthetic_vs_real.png]

Prints the numbers and writes a side-by-side picture (lung and mediastinal windows, histograms).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
REAL = (REPO.parent / "shared/data/real/CPTAC-LSCC_C3N-00247/"
        "1.3.6.1.4.1.14519.5.2.1.7085.2626.242193282649561899185427104083.mhd")


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Largest connected object above -500 HU, holes filled slice by slice."""
    m = hu > -500
    lab, n = ndi.label(m)
    if n == 0:
        return m
    m = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return np.stack([ndi.binary_fill_holes(s) for s in m])


def lung_mask(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Air inside the body below -400 HU: its two largest components, vessels filled in, edges eroded."""
    m = (hu < -400) & body
    m = ndi.binary_opening(m, iterations=1)
    lab, n = ndi.label(m)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:2] + 1
    m = np.isin(lab, keep[sizes[keep - 1] > 0.1 * sizes.max()])
    m = np.stack([ndi.binary_fill_holes(s) for s in m])
    return ndi.binary_erosion(m, iterations=2)


def stats(hu: np.ndarray) -> dict:
    hu = hu.astype(np.float32)
    body = body_mask(hu)
    lung = lung_mask(hu, body)
    v = hu[lung]
    parenchyma = v[v < -600]
    hp = hu - ndi.uniform_filter(hu, (1, 3, 3))
    local_sd = np.sqrt(np.maximum(ndi.uniform_filter(hu**2, (1, 5, 5)) - ndi.uniform_filter(hu, (1, 5, 5)) ** 2, 0))
    par = lung & (hu < -600)
    return {
        "lung_mean": float(v.mean()), "lung_median": float(np.median(v)), "lung_sd": float(v.std()),
        "lung_p5_p95": [float(p) for p in np.percentile(v, [5, 95])],
        "lung_dense_fraction": float((v > -500).mean()),  # vessels, airway walls, nodules
        "parenchyma_mean": float(parenchyma.mean()), "parenchyma_sd": float(parenchyma.std()),
        "lung_highpass_sd": float(hp[par].std()), "lung_local_sd_median": float(np.median(local_sd[par])),
        "body_median": float(np.median(hu[body])), "body_fat_fraction": float(((hu > -200) & (hu < -30))[body].mean()),
        "body_bone_fraction": float((hu > 300)[body].mean()), "lung_fraction_of_body": float(lung.sum() / body.sum()),
        "_lung": lung, "_body": body,
    }


def mid_slice(lung: np.ndarray) -> int:
    return int(np.argmax(lung.sum(axis=(1, 2))))


def main() -> None:
    import SimpleITK as sitk

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", default=str(REAL))
    ap.add_argument("--synthetic", help="a synthetic .mhd (default: generate one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "docs/img/synthetic_vs_real.png"))
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--gallery", action="store_true",
                    help="also write docs/img/synthetic_gallery.png and synthetic_nodules.png")
    ap.add_argument("--hila", action="store_true",
                    help="also write docs/img/synthetic_hila.png: the real scan's hila beside the synthetic "
                         "scan's with simple and with lobar hila")
    args = ap.parse_args()
    if args.gallery:
        gallery(args.seed, REPO / "docs/img")
    if args.hila:
        hila_figure(args.real, args.seed, args.index, REPO / "docs/img/synthetic_hila.png")

    real = sitk.GetArrayFromImage(sitk.ReadImage(args.real))
    if args.synthetic:
        syn = sitk.GetArrayFromImage(sitk.ReadImage(args.synthetic))
        name = Path(args.synthetic).name
    else:
        from nodulekit.data.synth import generate_scan

        scan = generate_scan(args.seed, args.index)
        syn = scan.ct.hu
        # direction may be flipped; only axial views and in-plane statistics are used
        name = f"synthetic seed {args.seed} index {args.index}"
    rs, ss = stats(real), stats(syn)
    keys = [k for k in rs if not k.startswith("_")]
    print(f"{'statistic':26s} {'real':>16s} {'synthetic':>16s}")
    for k in keys:
        fmt = (lambda x: "[" + ", ".join(f"{v:.0f}" for v in x) + "]") if isinstance(rs[k], list) else (
            lambda x: f"{x:.3f}" if abs(x) < 1 else f"{x:.1f}")
        print(f"{k:26s} {fmt(rs[k]):>16s} {fmt(ss[k]):>16s}")
    plot(real, syn, rs, ss, name, Path(args.out))
    if args.json:
        summary = {k: {"real": rs[k], "synthetic": ss[k]} for k in keys}
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")


def plot(real, syn, rs, ss, name, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zr, zs = mid_slice(rs["_lung"]), mid_slice(ss["_lung"])
    fig, ax = plt.subplots(2, 3, figsize=(16, 10.5))
    for row, (lo, hi, title) in enumerate(((-1350, 150, "lung window"), (-160, 240, "mediastinal window"))):
        for col, (vol, z, label) in enumerate(((real, zr, "real (CPTAC-LSCC)"), (syn, zs, name))):
            ax[row, col].imshow(vol[z], cmap="gray", vmin=lo, vmax=hi)
            ax[row, col].set_title(f"{label}, {title}")
            ax[row, col].axis("off")
    bins = np.arange(-1024, -300, 8)
    for vol, s, label in ((real, rs, "real"), (syn, ss, "synthetic")):
        ax[0, 2].hist(vol[s["_lung"]], bins=bins, density=True, histtype="step", lw=1.5, label=label)
        ax[1, 2].hist(vol[s["_body"]], bins=np.arange(-1024, 600, 10), density=True, histtype="step", lw=1.5,
                      label=label)
    ax[0, 2].set_title("HU in the lung mask")
    ax[1, 2].set_title("HU in the body mask")
    ax[1, 2].set_yscale("log")
    for a in ax[:, 2]:
        a.legend()
        a.set_xlabel("HU")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)


def gallery(seed: int, out_dir: Path) -> None:
    """Axial slices of a few synthetic scans, and close-ups of their nodules with the label outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nodulekit.data.synth import generate_scan

    scans = [generate_scan(seed, i, max_slices=96) for i in range(4)]
    fig, ax = plt.subplots(2, 4, figsize=(20, 10.5))
    for j, s in enumerate(scans):
        n = s.ct.shape[0]
        for row, z in enumerate((n // 3, 2 * n // 3)):
            ax[row, j].imshow(s.ct.hu[z], cmap="gray", vmin=-1350, vmax=150)
            ax[row, j].contour(s.labels[z] > 0, [0.5], colors="r", linewidths=0.7)
            ax[row, j].set_title(f"scan {j}, slice {z}/{n}, {s.ct.spacing[0]:.2f}x{s.ct.spacing[2]:.2f} mm")
            ax[row, j].axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "synthetic_gallery.png", dpi=60)
    crops = []
    for s in scans:
        for k, nod in enumerate(s.nodules, start=1):
            irc = np.rint(s.ct.world_to_voxel(nod.center_xyz)).astype(int)
            r, c, h = irc[1], irc[2], 40
            win = (slice(max(0, r - h), r + h), slice(max(0, c - h), c + h))
            crops.append((s.ct.hu[irc[0]][win], s.labels[irc[0]][win] == k, nod))
    crops = crops[:8]
    fig, ax = plt.subplots(2, len(crops), figsize=(2.6 * len(crops), 5.6), squeeze=False)
    for j, (im, lab, nod) in enumerate(crops):
        for row in (0, 1):
            ax[row, j].imshow(im, cmap="gray", vmin=-1350, vmax=150)
            ax[row, j].axis("off")
        ax[1, j].contour(lab, [0.5], colors="r", linewidths=0.8)
        ax[0, j].set_title(f"{nod.kind}, {nod.attached}\n{nod.diameter_mm:.1f} mm", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "synthetic_nodules.png", dpi=70)



def hila_figure(real_path: str, seed: int, index: int, out: Path) -> None:
    """The same heights of the lungs (45-62 % of their extent, where the hila are) in the real scan
    and in one synthetic scan drawn with each hilar anatomy, lung window, chest centre cropped."""
    import matplotlib
    import SimpleITK as sitk

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nodulekit.data.synth.scan import render_scan

    rows = [("real (CPTAC-LSCC)", sitk.GetArrayFromImage(sitk.ReadImage(real_path)))]
    for hila in ("simple", "lobar"):  # stored unflipped, so that both show the patient alike
        rows.append((f"synthetic seed {seed} index {index}, hila={hila}",
                     render_scan(seed, index, flip="", hila=hila).ct.hu))
    heights = (0.45, 0.52, 0.57, 0.62)
    fig, ax = plt.subplots(len(rows), len(heights), figsize=(5 * len(heights), 3.9 * len(rows)))
    for r, (label, hu) in enumerate(rows):
        z = np.flatnonzero(lung_mask(hu, body_mask(hu)).any(axis=(1, 2)))
        for c, f in enumerate(heights):
            k = int(z[0] + f * (z[-1] - z[0]))
            ny, nx = hu.shape[1:]
            ax[r, c].imshow(hu[k, ny // 5: 4 * ny // 5, nx // 8: 7 * nx // 8], cmap="gray", vmin=-1000, vmax=200)
            ax[r, c].set_title(f"{label}, {round(100 * f)} % up the lungs", fontsize=9)
            ax[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=45)


if __name__ == "__main__":
    main()
