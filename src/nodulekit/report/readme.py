"""The README's results table, rendered from a demo's ``report.json`` so that no figure is typed by hand.

The README holds the table between two markers (:data:`START` and :data:`END`); ``nodulekit report
DIR --readme README.md`` replaces what lies between them with :func:`results_markdown` of DIR's
report.json. The ratios and recall changes are read from the variant rows, which the compression
study writes; nothing here measures or recomputes them.
"""

from __future__ import annotations

from pathlib import Path

from nodulekit.errors import InputError
from nodulekit.io import atomic_write_text
from nodulekit.report.plots import primary_set
from nodulekit.report.render import load_report

START = "<!-- results:start -->"
END = "<!-- results:end -->"

HEADER = ["variant", "weight memory (KiB)", "x smaller", "CPU latency (ms)", "x faster", "pixel recall (%)",
          "change (pts)"]


def _fmt(v, fmt: str) -> str:
    return "n/a" if v is None else fmt.format(v)


def _times(v) -> str:
    return "n/a" if not v else f"{v:.2f}x"


def _pct(v) -> str:
    return _fmt(None if v is None else 100 * v, "{:.1f}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _npu_columns(report: dict) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and, per variant name, the cells of the RKNN builds (none without an ``npu`` section).

    The NPU ratio column appears only when the NPU rows carry ``weight_memory_ratio``."""
    rows = [r for r in report.get("npu") or [] if "name" in r]
    if not rows:
        return [], {}
    with_ratio = any("weight_memory_ratio" in r for r in rows)
    header = ["NPU weight memory (KiB)"] + (["NPU x smaller"] if with_ratio else []) + ["NPU sim. recall (%)"]
    cells = {}
    for r in rows:
        if "error" in r:
            cells[r["name"]] = ["failed"] + (["n/a"] if with_ratio else []) + ["n/a"]
            continue
        cells[r["name"]] = ([_fmt(r.get("weight_memory_kib"), "{:,.2f}")]
                            + ([_times(r.get("weight_memory_ratio"))] if with_ratio else [])
                            + [_pct(r.get("recall"))])
    return header, cells


def _cpu_line(report: dict) -> str | None:
    """One line from the study's CPU table: each row's latency and speed-up against the baseline in
    ONNX Runtime, as the table holds them (rows that failed are left out)."""
    rows = [r for r in report.get("cpu") or [] if "error" not in r and r.get("latency_us")]
    if not rows:
        return None
    parts = [f"{r['name']} {r['latency_us'] / 1000:,.1f} ms ({_times(r.get('latency_ratio'))})" for r in rows]
    return "CPU runtimes, one slice, same run: " + "; ".join(parts) + "."


def results_markdown(report: dict) -> str:
    """The results block: one table of the compression variants (with the RKNN builds' columns when
    the report has them), then one line each for held-out detection, the CPU runtimes (the study's CPU
    table) and the demo's time."""
    npu_header, npu_cells = _npu_columns(report)
    lead = primary_set(report["variants"])
    # end-to-end CPM leads when the variants were scored (nodulekit score)
    cpm_header = [f"CPM ({lead.replace('_', ' ')})", "CPM change"] if lead else []
    header = HEADER[:1] + cpm_header + HEADER[1:] + npu_header
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for r in report["variants"]:
        if "error" in r:
            cells = [r["name"], f"failed: {r['error']}"] + [""] * (len(HEADER) + len(cpm_header) - 2)
        else:
            latency = r.get("latency_us")
            froc = (r.get("froc") or {}).get(lead) or {}
            cpm = [_fmt(froc.get("cpm"), "{:.3f}"), _fmt(froc.get("cpm_change"), "{:+.3f}")] if lead else []
            cells = [r["name"], *cpm, _fmt(r.get("weight_memory_kib"), "{:,.2f}"),
                     _times(r.get("weight_memory_ratio")),
                     _fmt(None if latency is None else latency / 1000, "{:,.1f}"), _times(r.get("latency_ratio")),
                     _pct(r.get("recall")), _fmt(r.get("recall_change_pts"), "{:+.1f}")]
        if npu_header:
            cells += npu_cells.get(r["name"], ["n/a"] * len(npu_header))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    det = report.get("detection") or {}
    if det.get("cpm") is not None:
        ci = det.get("cpm_ci")
        line = f"Held-out detection: FROC CPM **{det['cpm']:.3f}**"
        if ci:
            line += f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})"
        if det.get("n_scans") is not None and det.get("n_nodules") is not None:
            line += f" on {det['n_scans']} scans with {det['n_nodules']} nodules"
        text += "\n\n" + line + "."
    cpu = _cpu_line(report)
    if cpu:
        text += "\n\n" + cpu
    timings = report.get("timings_s") or {}
    if timings:
        # the demo records its own total; a report without one is timed by its stages
        total = timings["total"] if "total" in timings else sum(timings.values())
        machine = report.get("machine") or {}
        where = f" on {machine['cpu']}, {machine['cores']} cores" if machine.get("cpu") and machine.get("cores") else ""
        which = "quick demo" if (report.get("demo") or {}).get("quick") else "demo"
        text += f"\n\nThe {which} took {_duration(total)}{where} (setting up `.venv` not included)."
    return text


def replace_block(text: str, block: str, source="README") -> str:
    """``text`` with everything between :data:`START` and :data:`END` replaced by ``block``.

    Raises:
        InputError: the markers are missing, repeated or out of order.
    """
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise InputError(source, f"needs exactly one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block.strip()}\n{END}{tail}"


def current_block(text: str) -> str:
    """What lies between the markers now, without the surrounding newlines."""
    if START not in text or END not in text:
        raise InputError("README", f"no {START} ... {END} block")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def update_readme(readme: str | Path, report_path: str | Path) -> Path:
    """Rewrite ``readme``'s results block from ``report_path`` (a report.json or the folder holding it),
    atomically."""
    readme = Path(readme)
    if not readme.is_file():
        raise InputError(readme, "file not found")
    block = results_markdown(load_report(report_path))
    return atomic_write_text(readme, replace_block(readme.read_text(encoding="utf-8"), block, readme))
