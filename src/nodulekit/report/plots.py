"""PNG plots of a compression study, drawn from the rows of ``report.json`` alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows):
    return [r for r in rows if "error" not in r]


def plot_bars(rows, out: Path) -> Path | None:
    """Weight memory, file size and latency per variant, side by side."""
    rows = _ok(rows)
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [r["name"] for r in rows]
    for ax, key, title in zip(axes, ("weight_memory_kib", "size_kib", "latency_us"),
                              ("Weight memory (KiB)", "File size (KiB)", "Latency (us)")):
        vals = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(names, vals, color=["#888888" if n == "baseline" else "#3b75af" for n in names])
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=7)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35, labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the ``(cost, quality)`` points no other point beats on both lower cost and higher
    quality (latency or memory against recall or CPM), sorted by cost."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(rows, out: Path) -> Path | None:
    """Recall against latency with the Pareto front."""
    rows = [r for r in _ok(rows) if r.get("latency_us") and r.get("recall") is not None]
    if not rows:
        return None
    plt = _plt()
    pts = [(r["latency_us"] / 1000.0, 100.0 * r["recall"]) for r in rows]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(*zip(*pts), color="#3b75af")
    for r, (x, y) in zip(rows, pts):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fx, fy = zip(*[pts[i] for i in front])
    ax.step(fx, fy, where="post", color="#d62728", label="Pareto front")
    ax.set_xlabel("Latency per 512x512 slice (ms)")
    ax.set_ylabel("Pixel recall (%)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# the set of scans the report leads with when several were scored: nothing was trained or chosen
# on the independent draw
PRIMARY_SETS = ("independent", "held_out")


def primary_set(rows) -> str | None:
    """The set of scans whose end-to-end FROC (``row["froc"]``) a report leads with: the
    independent draw when scored, else the held-out scans, else the first one; None without any."""
    present = list(dict.fromkeys(k for r in _ok(rows) for k in (r.get("froc") or {})))
    return next((k for k in PRIMARY_SETS if k in present), present[0] if present else None)


def _plot_cpm(rows, out: Path, x_of, xlabel: str, log_x: bool) -> Path | None:
    """CPM on the leading set against ``x_of(row)`` (lower is better), with the Pareto front."""
    lead = primary_set(rows)
    pts, names = [], []
    for r in _ok(rows):
        cpm, x = ((r.get("froc") or {}).get(lead) or {}).get("cpm"), x_of(r)
        if cpm is not None and x:
            pts.append((x, cpm))
            names.append(r["name"])
    if not pts:
        return None
    plt = _plt()
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(*zip(*pts), color="#3b75af")
    for name, (x, y) in zip(names, pts):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fx, fy = zip(*[pts[i] for i in front])
    ax.step(fx, fy, where="post", color="#d62728", label="Pareto front")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"CPM ({lead.replace('_', ' ')})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_cpm_memory(rows, out: Path) -> Path | None:
    """End-to-end CPM against the deployed file's weight memory."""
    return _plot_cpm(rows, out, lambda r: r.get("weight_memory_kib"), "Weight memory of the deployed file (KiB)",
                     log_x=True)


def plot_cpm_latency(rows, out: Path) -> Path | None:
    """End-to-end CPM against the deployed file's CPU latency per slice."""
    return _plot_cpm(rows, out, lambda r: r["latency_us"] / 1000.0 if r.get("latency_us") else None,
                     "CPU latency per 512x512 slice (ms)", log_x=False)


def plot_widths(rows, out: Path) -> Path | None:
    """Output channels of every conv before and after pruning."""
    pruned = next((r for r in _ok(rows) if r.get("widths_before") and r.get("widths_after")), None)
    if pruned is None:
        return None
    plt = _plt()
    before, after = pruned["widths_before"], pruned["widths_after"]
    layers = list(before)
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(layers)), 4))
    ax.bar(x - 0.2, [before[k] for k in layers], 0.4, label="before", color="#888888")
    ax.bar(x + 0.2, [after.get(k, 0) for k in layers], 0.4, label=f"after (ratio {pruned.get('prune_ratio')})",
           color="#3b75af")
    ax.set_xticks(x, [k.replace("unet.", "").replace("conv_block.block", "cb").replace(".block", "") for k in layers],
                  rotation=60, fontsize=7, ha="right")
    ax.set_ylabel("output channels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_histograms(rows, out: Path, variants=("baseline", "pruned", "qat")) -> Path | None:
    """Per-layer weight histograms of a few variants, overlaid."""
    rows = [r for r in _ok(rows) if r.get("weight_hist") and r["name"] in variants] or \
        [r for r in _ok(rows) if r.get("weight_hist")][:1]
    if not rows:
        return None
    plt = _plt()
    layers = list(rows[0]["weight_hist"])
    cols = 4
    nrows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.3 * nrows), squeeze=False)
    for ax, layer in zip(axes.ravel(), layers):
        for r in rows:
            h = r["weight_hist"].get(layer)
            if h:
                edges = np.asarray(h["edges"])
                ax.stairs(h["counts"], edges, label=r["name"])
        ax.set_title(layer.replace("unet.", ""), fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(layers):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


PLOTS = {
    "bars": ("plot_bars", plot_bars, "compression_bars.png"),
    "cpm_memory": ("plot_cpm_memory", plot_cpm_memory, "cpm_vs_memory.png"),
    "cpm_latency": ("plot_cpm_latency", plot_cpm_latency, "cpm_vs_latency.png"),
    "pareto": ("plot_pareto", plot_pareto, "recall_vs_latency.png"),
    "widths": ("plot_widths", plot_widths, "pruning_widths.png"),
    "hist": ("plot_hist", plot_histograms, "weight_histograms.png"),
}


def draw_all(rows, out_dir: Path) -> dict[str, str]:
    """Draw every plot the rows allow; returns ``{plot key: file name}``."""
    drawn = {}
    for key, (_, fn, fname) in PLOTS.items():
        if fn(rows, Path(out_dir) / fname):
            drawn[key] = fname
    return drawn
