"""PNG views of a detected nodule: axial, coronal and sagittal planes through its centre."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Lung window W1500 / L-600: parenchyma, vessels and solid nodules all visible at once.
WINDOW = (-1350.0, 150.0)
HALF_FIELD_MM = 40.0


def _region_plane(region, view, shape) -> np.ndarray:
    """The part of ``region`` (``(box, mask of the box)``) that ``view`` (per axis an index or a
    slice of step 1) shows, as a mask of the view's shape."""
    box, mask = region
    out = np.zeros([len(range(*v.indices(n))) for v, n in zip(view, shape) if isinstance(v, slice)], dtype=bool)
    src, dst = [], []
    for axis, (v, b) in enumerate(zip(view, box)):
        b_start, b_stop, _ = b.indices(shape[axis])
        if isinstance(v, slice):
            v_start, v_stop, _ = v.indices(shape[axis])
            lo, hi = max(v_start, b_start), min(v_stop, b_stop)
            if hi <= lo:
                return out
            src.append(slice(lo - b_start, hi - b_start))
            dst.append(slice(lo - v_start, hi - v_start))
        elif not b_start <= v < b_stop:
            return out
        else:
            src.append(v - b_start)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _window(center: int, half: int, dim: int) -> slice:
    return slice(max(center - half, 0), min(center + half + 1, dim))


def render_nodule(ct, labels: np.ndarray, candidate, path: str | Path, *,
                  half_field_mm: float = HALF_FIELD_MM, dpi: int = 100) -> Path:
    """Write a three-panel PNG around ``candidate`` (one :class:`NoduleRenderer` drawing once).

    Each panel is a ``2 * half_field_mm`` square field centred on the nodule, displayed in the
    lung window with its aspect corrected by the voxel spacing, and the candidate's segmentation
    outlined. The title holds the probability, diameter and world coordinates.

    Args:
        ct: the :class:`~nodulekit.data.volume.CTVolume`.
        labels: label volume of the candidates (same shape as ``ct.hu``).
        candidate: a :class:`~nodulekit.detect.candidates.Finding`.
        path: output PNG.
        half_field_mm: half the side of each panel's field of view.
        dpi: resolution of the figure.
    """
    with NoduleRenderer(half_field_mm=half_field_mm, dpi=dpi) as renderer:
        return renderer.render(ct, labels, candidate, path)


class NoduleRenderer:
    """Draws :func:`render_nodule`'s PNGs on one figure, reused from nodule to nodule.

    matplotlib spends about a third of a fresh three-panel PNG building the figure and its axes,
    and a fifth encoding the PNG at zlib's default level: a scan with dozens of marks draws them
    into the same axes and encodes at level 1 (files about a fifth larger, the same pixels). Use it
    as a context manager, or call :meth:`close`.
    """

    def __init__(self, *, half_field_mm: float = HALF_FIELD_MM, dpi: int = 100):
        # the object-oriented API: no pyplot figure manager, nothing global to close
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.half_field_mm, self.dpi = half_field_mm, dpi
        self.fig = Figure(figsize=(12, 4.6))
        FigureCanvasAgg(self.fig)
        # a fixed layout: tight_layout would draw the whole figure once more just to measure it
        self.axes = self.fig.subplots(1, 3, gridspec_kw={"left": 0.01, "right": 0.99, "bottom": 0.02, "top": 0.84,
                                                         "wspace": 0.04})
        for ax in self.axes:
            ax.set_xticks([])
            ax.set_yticks([])

    def __enter__(self) -> "NoduleRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.fig.clear()

    def render(self, ct, labels: np.ndarray, candidate, path: str | Path) -> Path:
        """Write the PNG of ``candidate`` to ``path`` (as :func:`render_nodule`)."""
        hu = ct.hu
        half = self.half_field_mm
        sx, sy, sz = ct.spacing
        zc, yc, xc = (int(round(v)) for v in candidate.center_irc)
        zc, yc, xc = (min(max(v, 0), d - 1) for v, d in zip((zc, yc, xc), hu.shape))
        zs = _window(zc, int(half / sz), hu.shape[0])
        ys = _window(yc, int(half / sy), hu.shape[1])
        xs = _window(xc, int(half / sx), hu.shape[2])

        def plane_mask(view):
            # the finding's own voxels (a blob split off a vessel tree outlines the blob, not the
            # tree), cut to the three planes only, not the whole volume (80 M voxels on a thin-slice scan)
            if candidate.region is not None:
                return _region_plane(candidate.region, view, hu.shape)
            return None if labels is None else labels[view] == candidate.label

        # with the usual direction matrix z grows towards the head: show the head at the top
        head_up = float(np.asarray(ct.direction)[2, 2]) >= 0
        vert = "lower" if head_up else "upper"
        planes = [
            ("axial", hu[zc, ys, xs], plane_mask((zc, ys, xs)), sy / sx, "upper"),
            ("coronal", hu[zs, yc, xs], plane_mask((zs, yc, xs)), sz / sx, vert),
            ("sagittal", hu[zs, ys, xc], plane_mask((zs, ys, xc)), sz / sy, vert),
        ]
        for ax, (name, img, outline, aspect, origin) in zip(self.axes, planes):
            for artist in [*ax.images, *ax.collections]:  # the previous nodule's picture and outline
                artist.remove()
            ax.relim()  # forget their data limits: the contour autoscales to what the axes hold
            ax.imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect, origin=origin,
                      interpolation="nearest")
            if outline is not None and outline.any() and min(outline.shape) > 1:
                rows, cols = outline.shape
                ax.contour(np.arange(cols), np.arange(rows), outline.astype(np.float32), levels=[0.5],
                           colors="tab:red", linewidths=1.0)
            ax.set_title(name)
        x, y, z = candidate.center_xyz
        self.fig.suptitle(f"{ct.seriesuid}\np={candidate.probability:.3f}  d={candidate.diameter_mm:.1f} mm  "
                          f"(x, y, z) = ({x:.1f}, {y:.1f}, {z:.1f}) mm", fontsize=10)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fig.savefig(path, dpi=self.dpi, pil_kwargs={"compress_level": 1})
        return path
