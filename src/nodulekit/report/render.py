"""Render a study's ``report.json`` into ``REPORT.md`` (English), ``REPORT.zh.md`` (Chinese) and PNGs.

``report.json`` is the only input, so ``nodulekit report DIR`` re-renders a finished study. Its
shape: ``{"baseline": name, "variants": [row, ...], "machine": {...}, "dataset": {...}}`` with
optional ``settings``, ``timings_s``, ``npu``, ``classifier`` and ``detection``. A variant row has
``name, params, weight_memory_kib, size_kib, latency_us, recall, precision, dice, artifact`` (recall
a fraction) or ``name`` and ``error``, and optionally ``froc``: its end-to-end detection scored on
sets of scans, ``{set: {FROC_KEYS...}}`` (:mod:`nodulekit.optimize.end_to_end`); every row of ``variants``, ``npu`` and ``classifier`` follows
:mod:`nodulekit.deploy.rows`, whose ratios (``weight_memory_ratio``, ``size_ratio``,
``latency_ratio``, ``recall_change_pts``) the measurement computed and the tables only show.
"""

from __future__ import annotations

import json
from pathlib import Path

from nodulekit.io import write_json
from nodulekit.errors import InputError
from nodulekit.log import get_logger
from nodulekit.report.i18n import REFERENCE, REFERENCE_BASELINE, STRINGS, VARIANT_NAMES
from nodulekit.report.plots import PLOTS, draw_all, primary_set

log = get_logger("report")

ROW_KEYS = ("name", "params", "weight_memory_kib", "size_kib", "latency_us", "recall", "precision", "dice",
            "artifact")
TOP_KEYS = ("baseline", "variants", "machine", "dataset")
# a variant's end-to-end FROC on one set of scans: CPM with its 95 % CI and change against the
# baseline, nodules found and false positives per scan at the classifier's threshold, candidates
# and seconds per scan, and the runtimes that ran the deployed file and the classifier
FROC_KEYS = ("cpm", "cpm_ci", "cpm_change", "n_scans", "n_nodules", "nodules_found", "fps_per_scan",
             "candidates_per_scan", "seconds_per_scan", "threshold", "runtime", "cls_runtime")


def _check_froc(row: dict, source) -> None:
    froc = row["froc"]
    if not isinstance(froc, dict) or not froc:
        raise InputError(source, f"variant {row['name']!r}: 'froc' must map a set of scans to its figures")
    for name, entry in froc.items():
        where = f"variant {row['name']!r}, froc {name!r}"
        if not isinstance(entry, dict):
            raise InputError(source, f"{where}: not an object")
        absent = [k for k in FROC_KEYS if k not in entry]
        if absent:
            raise InputError(source, f"{where} lacks {absent}")
        cpm, ci = entry["cpm"], entry["cpm_ci"]
        if cpm is not None and not 0.0 <= cpm <= 1.0:
            raise InputError(source, f"{where}: CPM {cpm} is not a fraction")
        if ci is not None and (len(ci) != 2 or not 0.0 <= ci[0] <= ci[1] <= 1.0):
            raise InputError(source, f"{where}: CPM CI {ci} is not an interval of fractions")
        if not (isinstance(entry["n_scans"], int) and entry["n_scans"] > 0):
            raise InputError(source, f"{where}: n_scans {entry['n_scans']!r} is not a positive count")
        found, total = entry["nodules_found"], entry["n_nodules"]
        if found is not None and not 0 <= found <= total:
            raise InputError(source, f"{where}: {found} nodules found of {total}")


def validate_report(report: dict, source="report.json") -> dict:
    """Check the report's shape (module docstring).

    Raises:
        InputError: a missing key or a malformed row.
    """
    missing = [k for k in TOP_KEYS if k not in report]
    if missing:
        raise InputError(source, f"missing top-level key(s) {missing}")
    if not isinstance(report["variants"], list):
        raise InputError(source, "'variants' must be a list")
    for row in report["variants"]:
        if "name" not in row:
            raise InputError(source, f"a variant row has no name: {sorted(row)}")
        if "error" in row:
            continue
        absent = [k for k in ROW_KEYS if k not in row]
        if absent:
            raise InputError(source, f"variant {row['name']!r} lacks {absent}")
        if row["recall"] is not None and not 0.0 <= row["recall"] <= 1.0:
            raise InputError(source, f"variant {row['name']!r}: recall {row['recall']} is not a fraction")
        if "froc" in row:
            _check_froc(row, source)
    return report


def write_report_json(report: dict, path: str | Path) -> Path:
    validate_report(report, path)
    return write_json(path, report)


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise InputError(path, "report.json not found")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    return validate_report(report, path)


# ---------------------------------------------------------------------------------------------
# formatting


def _num(v, fmt="{:,.1f}", na="n/a"):
    return na if v is None else fmt.format(v)


def _ratio(v):
    return "n/a" if not v else f"{v:.2f}x"


def _pts(v):
    return "n/a" if v is None else f"{v:+.1f}"


def _signed(v, fmt="{:+.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _set_label(name: str, s: dict) -> str:
    return s.get(f"set_{name}", name)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _main_table(rows, lang):
    s, names = STRINGS[lang], VARIANT_NAMES[lang]
    ok = [r for r in rows if "error" not in r]
    recall = lambda r: _num(None if r.get("recall") is None else 100 * r["recall"])  # noqa: E731
    if lang == "zh":
        body = [[names.get(r["name"], r["name"]), _num(r["weight_memory_kib"], "{:,.2f}"),
                 _ratio(r.get("weight_memory_ratio")), _num(r["size_kib"], "{:,.2f}"),
                 _num(r["latency_us"], "{:,.0f}"), _ratio(r.get("latency_ratio")), recall(r),
                 _pts(r.get("recall_change_pts"))] for r in ok]
    else:
        body = [[names.get(r["name"], r["name"]), _num(r.get("params"), "{:,}"),
                 _num(r["weight_memory_kib"], "{:,.2f}"), _ratio(r.get("weight_memory_ratio")),
                 _num(r["size_kib"], "{:,.2f}"), _ratio(r.get("size_ratio")), _num(r["latency_us"], "{:,.0f}"),
                 _ratio(r.get("latency_ratio")), recall(r), _pts(r.get("recall_change_pts")),
                 _num(None if r.get("precision") is None else 100 * r["precision"]),
                 _num(r.get("dice"), "{:.3f}")] for r in ok]
    lead = primary_set(rows)
    if lead is None:
        return _table(s["header"], body)
    # the detector's quality leads; pixel recall stays because the reference study reports it
    lead_cells = [[_num(f.get("cpm"), "{:.3f}"), _signed(f.get("cpm_change"))]
                  for f in ((r.get("froc") or {}).get(lead) or {} for r in ok)]
    header = [s["header"][0], *(c.format(set=_set_label(lead, s)) for c in s["cpm_cols"]), *s["header"][1:]]
    return _table(header, [[b[0], *c, *b[1:]] for b, c in zip(body, lead_cells)])


def _froc(rows, lang):
    """Each variant's end-to-end detection, one table per set of scans, the leading set first."""
    ok = [r for r in rows if "error" not in r and r.get("froc")]
    if not ok:
        return None
    s, names = STRINGS[lang], VARIANT_NAMES[lang]
    lead = primary_set(rows)
    sets = sorted(dict.fromkeys(k for r in ok for k in r["froc"]), key=lambda k: k != lead)
    parts = [f"## {s['froc']}", s["froc_why"]]
    for name in sets:
        body, first = [], None
        for r in ok:
            f = r["froc"].get(name)
            if not f:
                continue
            first = first or f
            ci = f.get("cpm_ci")
            found = "n/a" if f.get("nodules_found") is None else f"{f['nodules_found']}/{f['n_nodules']}"
            body.append([names.get(r["name"], r["name"]),
                         _num(f.get("cpm"), "{:.3f}") + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""),
                         _signed(f.get("cpm_change")), found, _num(f.get("fps_per_scan"), "{:.1f}"),
                         _num(f.get("candidates_per_scan"), "{:,.0f}"), _num(f.get("seconds_per_scan"), "{:.1f}"),
                         f.get("runtime") or "n/a"])
        title = s["froc_set"].format(set=_set_label(name, s), n=first["n_scans"], nodules=first["n_nodules"])
        parts.append(f"### {title}\n\n" + _table(s["froc_header"], body))
    return "\n\n".join(parts)


def _matched(rows, lang):
    """Each variant's recall at the baseline's pixel precision (see ``recall_at_precision``)."""
    ok = [r for r in rows if "error" not in r and "recall_at_baseline_precision" in r]
    if not ok:
        return None
    s, names = STRINGS[lang], VARIANT_NAMES[lang]
    known = lambda v: v is not None and v == v  # noqa: E731 - NaN is written to JSON as null
    base_recall = next((r["recall_at_baseline_precision"] for r in ok if r["name"] == "baseline"), None)
    pct = lambda v: _num(100 * v if known(v) else None)  # noqa: E731
    body = []
    for r in ok:
        matched, thr = r["recall_at_baseline_precision"], r.get("threshold_at_baseline_precision")
        change = 100 * (matched - base_recall) if known(matched) and known(base_recall) else None
        body.append([names.get(r["name"], r["name"]), pct(r.get("precision")), pct(r.get("recall")),
                     _num(thr if known(thr) else None, "{:.3f}"), pct(matched), _pts(change)])
    return f"## {s['matched']}\n\n{s['matched_note']}\n\n" + _table(s["matched_header"], body)


def _reference(lang):
    s, names = STRINGS[lang], VARIANT_NAMES[lang]
    base = next(r for r in REFERENCE if r["name"] == REFERENCE_BASELINE)
    body = []
    for r in REFERENCE:
        wm, lat = r["weight_memory_kib"], r["latency_us"]
        body.append([names.get(r["name"], r["name"]), _num(wm, "{:,.2f}"),
                     _ratio(base["weight_memory_kib"] / wm if wm else None), _num(lat, "{:,.0f}"),
                     _ratio(base["latency_us"] / lat if lat else None), _num(r["recall"]),
                     _pts(r["recall_change_pts"])])
    return f"## {s['reference']}\n\n{s['reference_note']}\n\n" + _table(s["ref_header"], body)


def _section(report, key: str, header: str, note: str | None, cells, lang):
    """A titled table of ``report[key]``'s rows, one ``cells(row, strings)`` list per row."""
    rows = report.get(key)
    if not rows:
        return None
    s = STRINGS[lang]
    intro = f"## {s[key]}\n\n" + (f"{s[note]}\n\n" if note else "")
    return intro + _table(s[header], [cells(r, s) for r in rows])


def _npu(report, lang):
    return _section(report, "npu", "npu_header", "npu_note", lambda r, s: [
        r["name"], _num(r.get("weight_memory_kib"), "{:,.2f}"), _ratio(r.get("weight_memory_ratio")),
        _num(r.get("internal_memory_kib"), "{:,.0f}"), _num(r.get("size_kib"), "{:,.2f}"),
        _num(None if r.get("recall") is None else 100 * r["recall"]), _fallback(r.get("cpu_fallback_layers")),
        _num(r.get("latency_us"), "{:,.0f}", s["needs_board"])], lang)


def _cpu(report, lang):
    return _section(report, "cpu", "cpu_header", "cpu_note", lambda r, s: [
        r["name"], _num(r.get("weight_memory_kib"), "{:,.2f}"), _num(r.get("size_kib"), "{:,.2f}"),
        _num(r.get("latency_us"), "{:,.0f}"), _ratio(r.get("latency_ratio")),
        _num(None if r.get("recall") is None else 100 * r["recall"]), _pts(r.get("recall_change_pts"))]
        if "error" not in r else [r["name"]] + ["n/a"] * 5 + [f"`{r['error']}`"], lang)


def _fallback(layers) -> str:
    """CPU-fallback layers of an RKNN build: their count, and their names when there are any."""
    if layers is None:
        return "n/a"
    if isinstance(layers, (int, float)):
        return f"{layers:g}"
    return f"{len(layers)}" + (f" ({', '.join(map(str, layers))})" if layers else "")


def _classifier(report, lang):
    return _section(report, "classifier", "cls_header", None, lambda r, s: [
        r["name"], _num(r.get("params"), "{:,}"), _num(r.get("weight_memory_kib"), "{:,.2f}"),
        _num(r.get("size_kib"), "{:,.2f}"), _num(r.get("latency_us"), "{:,.0f}", s["needs_board"]),
        _num(r.get("auc"), "{:.4f}"), _num(r.get("f1"), "{:.3f}"), _num(r.get("max_abs_diff_vs_3d"), "{:.2e}")], lang)


def _detection(report, lang):
    det = report.get("detection")
    if not det:
        return None
    s = STRINGS[lang]
    text = f"## {s['detection']}\n\n{s['det_cpm']}: {_num(det.get('cpm'), '{:.3f}')}"
    ci = det.get("cpm_ci")
    if ci:
        text += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    fps, sens = det.get("fps_per_scan") or [], det.get("sensitivities") or []
    if fps and sens:
        text += "\n\n" + _table(s["det_header"], [[f"{f:g}", f"{100 * v:.1f}%"] for f, v in zip(fps, sens)])
    ops = det.get("operating_points")
    if ops:
        keys = list(dict.fromkeys(k for op in ops for k in op))
        text += "\n\n" + _table(keys, [[op.get(k, "") for k in keys] for op in ops])
    if det.get("froc_png"):
        text += f"\n\n![FROC]({det['froc_png']})"
    viewers = det.get("viewers")
    if viewers:
        text += f"\n\n{s['det_viewers']}\n\n" + "\n".join(f"- [{uid}]({path})" for uid, path in viewers.items())
    return text


def _kv(d: dict) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in d.items() if not isinstance(v, (list, dict)) or k.endswith("size"))


def render_markdown(report: dict, lang: str, plots: dict[str, str]) -> str:
    """One Markdown report in ``lang`` (``en`` or ``zh``)."""
    s = STRINGS[lang]
    rows = report["variants"]
    parts = [f"# {s['title']}", s["intro"], f"## {s['main']}", _main_table(rows, lang), s["memory_note"]]
    froc = _froc(rows, lang)
    if froc:
        parts.append(froc)
    errors = [r for r in rows if "error" in r]
    if errors:
        parts += [f"### {s['errors']}", "\n".join(f"- {r['name']}: `{r['error']}`" for r in errors)]
    settings = report.get("settings")
    if settings:
        try:
            shown = dict(settings)
            if "dice_area_cap" in shown and not shown["dice_area_cap"]:
                shown["dice_area_cap"] = "∞"  # no cap
            parts += [f"## {s['settings']}", s["settings_text"].format(**shown)]
        except KeyError:
            parts += [f"## {s['settings']}", _kv(settings)]
        if any(r["name"].endswith("ptq") for r in rows):
            parts.append(s["why_ptq"])
    matched = _matched(rows, lang)
    if matched:
        parts.append(matched)
    parts.append(_reference(lang))
    for section in (_cpu(report, lang), _npu(report, lang), _classifier(report, lang), _detection(report, lang)):
        if section:
            parts.append(section)
    if plots:
        parts.append(f"## {s['plots']}")
        for key, fname in plots.items():
            caption = s[PLOTS[key][0]]
            parts.append(f"### {caption}\n\n![{caption}]({fname})")
    parts += [f"## {s['machine']}", _kv(report["machine"]), f"## {s['dataset']}", _kv(report["dataset"])]
    timings = report.get("timings_s")
    if timings:
        parts += [f"## {s['timings']}", _table(s["timing_header"], [[k, f"{v:,.1f}"] for k, v in timings.items()])]
    return "\n\n".join(parts) + "\n"


def render_report(study_dir: str | Path) -> dict[str, Path]:
    """Re-render ``REPORT.md``, ``REPORT.zh.md`` and the plots of a study folder from its report.json."""
    study_dir = Path(study_dir)
    report = load_report(study_dir / "report.json")
    plots = draw_all(report["variants"], study_dir)
    out = {}
    for lang, fname in (("en", "REPORT.md"), ("zh", "REPORT.zh.md")):
        out[lang] = study_dir / fname
        out[lang].write_text(render_markdown(report, lang, plots), encoding="utf-8")
    log.info("wrote %s, %s and %d plots", out["en"], out["zh"], len(plots))
    return {**out, **{k: study_dir / v for k, v in plots.items()}}
