"""Render docs/model-card.md from what `make model-card` measured with the shipped weights.

Reads the package's weights manifest, the FROC of the shipped weights on the independent synthetic
draw (and, when given, the demo recipe's FROC on the same draw and the recipes `make seeds` judged
over several training seeds there), and the detections on the shared
real scans; copies the PNG of every mark above the threshold on the real scans next to the card,
so that a reader can judge each one. Every figure in the card comes from those files.

    python scripts/model_card.py --froc runs/model-card/independent/evaluate/froc.json \
        --real runs/model-card/real/nodules.json [--demo-froc runs/independent/evaluate/froc.json] \
        [--seeds runs/seeds/seeds.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from nodulekit.io import atomic_write_text
from nodulekit.models.shipped import read_manifest

REAL_ATTRIBUTION = (
    "The real scans are from The Cancer Imaging Archive under CC BY 3.0: LIDC-IDRI (Armato III et al., "
    "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX) and CPTAC-LSCC (National Cancer Institute CPTAC, "
    "https://doi.org/10.7937/k9/tcia.2018.6emub5l2); the pictures below are crops of them.")


def _froc_line(froc: dict) -> str:
    lo, hi = froc.get("cpm_ci") or (float("nan"), float("nan"))
    at = froc.get("operating_points", {}).get("at_threshold") or {}
    found = at.get("true_positives")
    return (f"CPM **{froc['cpm']:.3f}** (95 % CI {lo:.3f}-{hi:.3f}) on {froc['n_scans']} scans with "
            f"{froc['n_nodules']} nodules; at p >= 0.5, {found}/{froc['n_nodules']} nodules found at "
            f"{at.get('fps_per_scan', float('nan')):.1f} false marks per scan")


def _seeds_lines(seeds: dict) -> list[str]:
    """The recipes `make seeds` judged on the same draw: mean CPM over the training seeds, spread."""
    lines = ["", f"Recipes judged over training seeds on the same draw (`make seeds`, {_draw(seeds)}):", "",
             "| recipe | settings changed | seeds | CPM mean | SD | CPM per seed |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in seeds["recipes"]:
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or f"none (the {seeds['base']}'s)"
        sd = "n/a" if r["cpm_sd"] is None else f"{r['cpm_sd']:.3f}"
        lines.append(f"| {r['name']} | {over} | {len(r['seeds'])} | {r['cpm_mean']:.3f} | {sd} | "
                     + " / ".join(f"{s['cpm']:.3f}" for s in r["seeds"]) + " |")
    return lines


def _draw(seeds: dict) -> str:
    ind = seeds["independent"]
    return f"{ind['n_scans']} scans, {ind['n_nodules']} nodules, each seed trained on synthetic seed {seeds['data_seed']}"


def render(manifest: dict, froc: dict, real: dict, img_dir: Path, card: Path, demo_froc: dict | None,
           threshold: float, max_pictures: int = 10, seeds: dict | None = None) -> str:
    recipe = manifest["recipe"]
    files = manifest["files"]
    stage = manifest.get("stage_seconds", {})
    lines = [
        "# Model card: nodulekit's shipped weights",
        "",
        "`nodulekit detect CT --out DIR` uses these two files when `--seg` and `--cls` are not given. They "
        "are in `src/nodulekit/models/weights/` with `manifest.json`, which records their hashes, the recipe "
        "and the measurements below; `nodulekit detect` refuses a file whose hash does not match.",
        "",
        "| file | model | parameters | bytes | SHA-256 |",
        "| --- | --- | ---: | ---: | --- |",
        f"| seg.pt | U-Net candidate segmentation (BatchNorm2d(7), depth 3, widths 16/32/64, sigmoid) | "
        f"{files['seg']['params']:,} | {files['seg']['bytes']:,} | `{files['seg']['sha256']}` |",
        f"| cls.pt | 3D CNN false-positive reduction (LunaModel, 32x48x48 crops) | {files['cls']['params']:,} | "
        f"{files['cls']['bytes']:,} | `{files['cls']['sha256']}` |",
        "",
        "## Data and recipe",
        "",
        f"- Trained on {manifest['trained_on']}: nodulekit's generator of LUNA16-format chest CT "
        "(lungs, airways, vessel trees, heart and hila, chest wall and bone, nodules of every kind with "
        "their LUNA16 annotations). No real CT was used for training.",
        f"- Recipe: `{recipe['command']}` (`nodulekit weights`): segmentation {recipe['seg_epochs']} epochs x "
        f"{recipe['seg_steps']} steps, the segmentation's false positives mined on {recipe['mine_slices']} "
        f"middle slices of every training scan, classifier {recipe['cls_epochs']} epochs x {recipe['cls_steps']} "
        f"steps with hard negatives, the mined negatives from epoch {recipe['cls_detector_from']}, and "
        "synthetic nodules inserted at candidate sites.",
        f"- It took {manifest['seconds'] / 60:.0f} min on 2 CPU cores ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage.items()) + f"), created {manifest['created']}.",
        "",
        "## Detection on scans nothing was trained or chosen on",
        "",
        f"Independent synthetic draw (`make model-card`): {_froc_line(froc)}.",
    ]
    used = real.get("settings", {})
    if used.get("views", 1) > 1:
        mean = used.get("view_mean", "arithmetic")  # detections made before the option averaged arithmetically
        lines += ["", f"Detection here is `nodulekit detect`'s default: a candidate whose crop the classifier scores "
                      f"at {used['views_from']:g} or more gets the {mean} mean over {used['views']} mirror images of "
                      "the crop (`--views`, `--view-mean`)."]
    if demo_froc is not None:
        lines += ["", f"The demo's recipe (`make demo`, then `make froc-independent`) on the same draw: "
                      f"{_froc_line(demo_froc)}."]
    if seeds is not None:
        lines += _seeds_lines(seeds)
    lines += ["", f"Held-out scans of the training draw, when `make weights` built them: "
                  f"CPM {manifest['held_out']['cpm']:.3f} on "
                  f"{manifest['held_out']['n_scans']} scans with {manifest['held_out']['n_nodules']} nodules.",
              "", "## Marks on real CT", "",
              f"Every mark above p = {threshold:g} on the two shared real series (`make model-card` runs `nodulekit "
              f"detect` with the shipped weights on them), the {max_pictures} most probable of each series shown so "
              "that a reader can judge them (all of them are in the series' `nodules.json`). LIDC-IDRI-0002's 12 "
              "slices hold no nodule that LUNA16 lists: every mark there is false. The CPTAC scan has no nodule "
              "list.", ""]
    img_dir.mkdir(parents=True, exist_ok=True)
    for scan in real["scans"]:
        marks = [n for n in scan["nodules"] if n["probability"] >= threshold]
        src = Path(scan["input"])
        name = src.parent.name if src.suffix else src.name  # the series' folder, for a file too
        lines.append(f"### {name} ({scan['geometry']['shape_zyx'][0]} slices): {len(marks)} mark(s) above "
                     f"{threshold:g}")
        lines.append("")
        if marks:
            lines += ["| # | probability | centre (x, y, z mm) | long axis (mm) | picture |",
                      "| ---: | ---: | --- | ---: | --- |"]
        for k, n in enumerate(marks):
            png = Path(n["png"]) if n.get("png") else None
            cell = "(listed only)" if k >= max_pictures else "(no picture)"
            if png is not None and png.is_file() and k < max_pictures:
                dest = img_dir / f"{scan['seriesuid'][-12:]}_{k}.png"
                shutil.copyfile(png, dest)
                cell = f"![mark {k}]({dest.relative_to(card.parent).as_posix()})"
            x, y, z = n["center_xyz"]
            lines.append(f"| {k} | {n['probability']:.3f} | {x:.1f}, {y:.1f}, {z:.1f} | {n['long_axis_mm']:.1f} "
                         f"| {cell} |")
        lines.append("")
    lines += [REAL_ATTRIBUTION, "", "## Limits", "",
              "- Trained on synthetic CT only. The generator's anatomy is simpler than real anatomy, most of all "
              "at the hila and the mediastinum, which is where the false marks on real scans sit.",
              "- Not a medical device, not validated on patients, and not for diagnosis: a research and "
              "engineering baseline for nodule detection on CPUs and RK3588 NPUs.",
              "- For real use, train on LUNA16 or on your own annotated CT (README, \"Training on LUNA16\").",
              ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--froc", required=True, type=Path, help="froc.json of the shipped weights, independent draw")
    ap.add_argument("--real", required=True, type=Path, help="nodules.json of detect on the real scans")
    ap.add_argument("--demo-froc", type=Path, help="froc.json of the demo's models on the same draw")
    ap.add_argument("--seeds", type=Path, help="seeds.json of `make seeds` on the same draw")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--max-pictures", type=int, default=10, help="pictures per real series (the rest are listed)")
    ap.add_argument("--out", type=Path, default=Path("docs/model-card.md"))
    args = ap.parse_args()
    img_dir = args.out.parent / "img" / "model-card"
    shutil.rmtree(img_dir, ignore_errors=True)
    text = render(read_manifest(), json.loads(args.froc.read_text()), json.loads(args.real.read_text()), img_dir,
                  args.out, json.loads(args.demo_froc.read_text()) if args.demo_froc else None, args.threshold,
                  args.max_pictures, json.loads(args.seeds.read_text()) if args.seeds else None)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out} and {len(list(img_dir.glob('*.png')))} pictures in {img_dir}")


if __name__ == "__main__":
    main()
