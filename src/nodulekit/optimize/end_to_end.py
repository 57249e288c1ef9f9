"""Each segmentation variant of a study judged as a user sees it: detection with its deployed file in
its runtime, the same classifier behind every variant, and LUNA16 FROC on sets of scans.

Pixel recall at threshold 0.5 rewards a variant that marks more pixels; the detector's user sees
nodules found and false marks per scan, which the competition metric (CPM, the mean sensitivity at
1/8 to 8 false positives per scan) sums up. Each variant row of the study's ``report.json`` gains a
``froc`` object, one entry per set of scans (:data:`nodulekit.report.render.FROC_KEYS`), and the
report leads with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nodulekit import CLS_THRESHOLD
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("optimize")



@dataclass(frozen=True)
class ScanSet:
    """Scans a study is scored on: a LUNA16-layout folder (``subset*/`` scans, ``annotations.csv``,
    ``annotations_excluded.csv``), narrowed to the held-out side of ``split`` when given."""

    name: str
    data: Path
    split: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "ScanSet":
        """``NAME=DIR`` or ``NAME=DIR@SPLIT`` (the held-out scans of a ``split.json``)."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"expected NAME=DIR or NAME=DIR@SPLIT, got {text!r}")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a set name is letters, digits, '_' and '-', got {name!r}")
        data, _, split = rest.partition("@")
        return cls(name, Path(data), Path(split) if split else None)

    def uids(self) -> list[str]:
        from nodulekit.data.luna import find_series
        from nodulekit.data.split import load_split

        found = find_series(self.data)
        if self.split is None:
            return sorted(found)
        held_out = load_split(self.split)[1]
        missing = [u for u in held_out if u not in found]
        if missing:
            raise InputError(self.split, f"{len(missing)} held-out scan(s) are not in {self.data}, e.g. {missing[0]}")
        return held_out


def score_variant(seg: str | Path, cls: str | Path, scans: ScanSet, uids: list[str], out_dir: Path, *,
                  backend: str = "onnx", cls_backend: str = "auto", threads: int = 2,
                  progress: bool | None = None) -> dict:
    """Detect on ``uids`` of ``scans`` with ``seg`` and ``cls`` into ``out_dir`` and score it.

    Returns:
        The variant's entry for this set (``FROC_KEYS`` of :mod:`nodulekit.report.render` but
        ``cpm_change``, which needs the baseline's).
    """
    from nodulekit.data.luna import select_series, write_seriesuids
    from nodulekit.deploy.runtime import resolve_backend
    from nodulekit.detect import run_detection
    from nodulekit.evaluate.froc import evaluate_froc

    files = select_series(scans.data, uids)
    t0 = time.perf_counter()
    det = run_detection(list(files.values()), seg, cls, out_dir / "detect", backend=backend,
                        cls_backend=cls_backend, threads=threads, png=False, progress=progress)
    seconds = time.perf_counter() - t0
    if det.get("scans_failed"):
        raise InputError(seg, f"detection failed on {det['scans_failed']} scan(s) of {scans.name}, "
                              f"e.g. {det['failed'][0].get('error') if det.get('failed') else '?'}")
    uids_csv = write_seriesuids(out_dir / "seriesuids.csv", uids)
    excluded = scans.data / "annotations_excluded.csv"
    froc = evaluate_froc(det["csv"], scans.data / "annotations.csv",
                         excluded_csv=excluded if excluded.is_file() else None, seriesuids_csv=uids_csv,
                         out_dir=out_dir, threshold=CLS_THRESHOLD)
    at = froc["operating_points"].get("at_threshold") or {}
    n = max(1, len(uids))
    return {"cpm": froc["cpm"], "cpm_ci": froc.get("cpm_ci"), "n_scans": froc["n_scans"],
            "n_nodules": froc["n_nodules"], "nodules_found": at.get("true_positives"),
            "fps_per_scan": at.get("fps_per_scan"), "candidates_per_scan": round(det["n_candidates"] / n, 1),
            "seconds_per_scan": round(seconds / n, 2), "threshold": CLS_THRESHOLD,
            "runtime": resolve_backend(seg, backend), "cls": str(cls),
            "cls_runtime": resolve_backend(cls, cls_backend)}


def score_study(study_dir: str | Path, cls: str | Path, sets: list[ScanSet], *, variants=None,
                backend: str = "onnx", cls_backend: str = "auto", threads: int = 2, also=(),
                progress: bool | None = None) -> dict:
    """Score every variant of a study end to end on each set of scans; writes ``froc`` into each
    row of ``<study_dir>/report.json`` (after each variant, atomically, so that an interrupted run
    keeps what it finished), and into the rows of the same name in the ``also`` reports (the
    demo's combined report), then re-renders them.

    Args:
        study_dir: a study folder (``nodulekit optimize``'s ``--out``).
        cls: the classifier every variant's candidates go through.
        sets: the sets of scans.
        variants: names to score (default: every row with a deployed file).
        backend: runtime of the segmentation files: ``onnx`` (ONNX Runtime, the runtime of the
            main table's other columns), ``openvino`` or ``auto``.
        cls_backend: runtime of the classifier.
        threads: CPU threads of the runtimes.
        also: other report folders whose rows get the same ``froc`` objects.

    Returns:
        The updated study report.
    """
    from nodulekit.report.render import load_report, render_report, write_report_json

    study_dir = Path(study_dir)
    report = load_report(study_dir / "report.json")
    rows = {r["name"]: r for r in report["variants"] if "error" not in r and r.get("artifact")}
    names = list(rows) if variants is None else list(variants)
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise InputError(study_dir / "report.json", f"no deployed variant named {unknown[0]!r} "
                                                    f"(has {', '.join(rows) or 'none'})")
    if not sets:
        raise InputError("--set", "give at least one set of scans")
    names_seen = [s.name for s in sets]
    if len(set(names_seen)) != len(names_seen):
        raise InputError("--set", f"each set of scans needs its own name, got {', '.join(names_seen)}")
    uids = {s.name: s.uids() for s in sets}
    for name in names:
        row = rows[name]
        for s in sets:
            log.info("%s on %s (%d scans)", name, s.name, len(uids[s.name]))
            entry = score_variant(study_dir / row["artifact"], cls, s, uids[s.name], study_dir / "froc" / s.name / name,
                                  backend=backend, cls_backend=cls_backend, threads=threads, progress=progress)
            row.setdefault("froc", {})[s.name] = entry
            log.info("%s on %s: CPM %.3f, %s/%s nodules at p >= %g, %.1f FP per scan", name, s.name, entry["cpm"],
                     entry["nodules_found"], entry["n_nodules"], CLS_THRESHOLD, entry["fps_per_scan"] or 0.0)
        add_cpm_changes(report)
        write_report_json(report, study_dir / "report.json")
    render_report(study_dir)
    for other in also:
        other = Path(other)
        doc = load_report(other / "report.json")
        for row in doc["variants"]:
            if row.get("name") in rows and "froc" in rows[row["name"]]:
                row["froc"] = rows[row["name"]]["froc"]
        write_report_json(doc, other / "report.json")
        render_report(other)
    return report


def add_cpm_changes(report: dict) -> None:
    """``froc[set]["cpm_change"]``: each variant's CPM minus the baseline's on the same set."""
    base = next((r for r in report["variants"] if r["name"] == report.get("baseline")), None)
    base_froc = (base or {}).get("froc", {})
    for row in report["variants"]:
        for name, entry in row.get("froc", {}).items():
            ref = base_froc.get(name, {}).get("cpm")
            entry["cpm_change"] = None if ref is None or entry.get("cpm") is None else round(entry["cpm"] - ref, 4)

