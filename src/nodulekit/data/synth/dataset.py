"""Writing synthetic scans in the LUNA16 layout (images, masks and the CSV tables)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from nodulekit.data.ct import write_ct
from nodulekit.data.synth.hila import HILA
from nodulekit.data.synth.scan import GENERATOR_VERSION, check_thick_share, generate_scan
from nodulekit.data.volume import CTVolume
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("synth")

ANNOTATION_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm"
CANDIDATE_HEADER = "seriesuid,coordX,coordY,coordZ,class"


def _xyz(p) -> str:
    return ",".join(f"{float(v):.4f}" for v in p)


def _write_one(args) -> dict:
    out_dir, seed, index, size, max_slices, hila, thick_share = args
    scan = generate_scan(seed, index, size=size, max_slices=max_slices, hila=hila, thick_share=thick_share)
    uid = scan.ct.seriesuid
    write_ct(scan.ct, out_dir / "subset0" / f"{uid}.mhd")
    mask = CTVolume(scan.labels, scan.ct.origin, scan.ct.spacing, scan.ct.direction, seriesuid=uid)
    write_ct(mask, out_dir / "masks" / f"{uid}.mhd", compress=True, dtype=np.uint16)
    ann = [f"{uid},{_xyz(n.center_xyz)},{n.diameter_mm:.2f}" for n in scan.nodules]
    exc = [f"{uid},{_xyz(n.center_xyz)},{n.diameter_mm:.2f}" for n in scan.excluded]
    cand = [f"{uid},{_xyz(n.center_xyz)},1" for n in scan.nodules]
    cand += [f"{uid},{_xyz(p)},0" for p in scan.negatives]
    meta = dict(scan.meta)
    meta["findings"] = [
        {"label": k + 1, "center_xyz": [round(float(v), 4) for v in n.center_xyz], "diameter_mm": n.diameter_mm,
         "kind": n.kind, "attached": n.attached} for k, n in enumerate(scan.nodules)]
    return {"uid": uid, "annotations": ann, "excluded": exc, "candidates": cand, "meta": meta}


def generate_dataset(out_dir, n_scans: int, seed: int, *, size: int = 512, max_slices: int | None = None,
                     workers: int = 1, progress: bool = True, hila: str = "simple",
                     thick_share: float = 0.0) -> dict:
    """Generate ``n_scans`` synthetic CT scans with nodules in the LUNA16 layout under ``out_dir``.

    Writes ``subset0/<uid>.mhd+.raw`` (int16 HU), ``masks/<uid>.mhd+.zraw`` (uint16 labels, k = the
    k-th annotation row of that uid), ``annotations.csv``, ``annotations_excluded.csv``,
    ``candidates.csv``, ``seriesuids.csv`` and ``synth.json``. The same arguments give the same bytes.

    Args:
        out_dir: output folder (created).
        n_scans: number of scans.
        seed: dataset seed (non-negative).
        size: in-plane voxels per side (spacing scales by 512/size below 512).
        max_slices: cap on the slice count per scan.
        workers: processes; 1 renders in this process.
        progress: show a tqdm progress bar.
        hila: ``simple`` or ``lobar`` hilar anatomy (:func:`~nodulekit.data.synth.generate_scan`).
        thick_share: share of scans with 3 mm slices (:func:`~nodulekit.data.synth.generate_scan`).

    Returns:
        Summary dict: ``scans``, ``nodules``, ``excluded``, ``candidates``, ``candidates_class0``,
        ``candidates_class1``, ``seconds``, ``out_dir``.
    """
    from tqdm import tqdm

    if n_scans < 1:
        raise InputError(str(out_dir), f"n_scans must be >= 1, got {n_scans}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if hila not in HILA:  # before any worker starts
        raise InputError("--hila", f"{hila!r}: expected one of {', '.join(HILA)}")
    thick_share = check_thick_share(thick_share)
    jobs = [(out, seed, i, size, max_slices, hila, thick_share) for i in range(n_scans)]
    log.info("generating %d scans (seed %d, %dx%d) into %s", n_scans, seed, size, size, out)
    bar = dict(total=n_scans, desc="synth", unit="scan", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_write_one, jobs), **bar))
    else:
        results = [_write_one(j) for j in tqdm(jobs, **bar)]

    def table(path, header, rows):
        path.write_text("\n".join([header, *rows]) + "\n")

    table(out / "annotations.csv", ANNOTATION_HEADER, [r for res in results for r in res["annotations"]])
    table(out / "annotations_excluded.csv", ANNOTATION_HEADER, [r for res in results for r in res["excluded"]])
    cand = [r for res in results for r in res["candidates"]]
    table(out / "candidates.csv", CANDIDATE_HEADER, cand)
    (out / "seriesuids.csv").write_text("".join(f"{res['uid']}\n" for res in results))
    n1 = sum(r.endswith(",1") for r in cand)
    summary = {
        "scans": n_scans,
        "nodules": sum(len(res["annotations"]) for res in results),
        "excluded": sum(len(res["excluded"]) for res in results),
        "candidates": len(cand),
        "candidates_class0": len(cand) - n1,
        "candidates_class1": n1,
    }
    params = {"seed": seed, "n_scans": n_scans, "size": size, "max_slices": max_slices,
              "hila": hila, "thick_share": thick_share, "generator": "nodulekit.data.synth",
              "version": GENERATOR_VERSION}
    doc = {"parameters": params, "summary": summary, "scans": [res["meta"] for res in results]}
    (out / "synth.json").write_text(json.dumps(doc, indent=1) + "\n")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["out_dir"] = str(out)
    log.info("wrote %d scans, %d nodules, %d candidates in %.1f s", n_scans, summary["nodules"], len(cand),
             summary["seconds"])
    return summary
