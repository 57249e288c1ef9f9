"""A scan viewer in one self-contained HTML file: no network, no server, any browser.

The axial slices travel as JPEG images inside the page. Before encoding, HU are mapped to one byte
by a piecewise-linear curve (8 HU a step in the lung range, 4 HU from -224 to +288 HU, 40 HU above),
so that both the lung and the mediastinal window show real contrast; the page maps the bytes back
to HU through the same curve and applies the chosen window. A slice is decoded only when shown (and
its neighbours just before), so a 300-slice scan scrolls at once after loading.

Each candidate's outline (its boundary pixels on every slice it spans) is drawn in a colour from
blue (probability 0) to red (1). The table lists the candidates, those at or above the threshold
by default; clicking a row shows the nodule's centre slice. ``#slice=K`` (0-based) in the address
opens slice K, which is how ``nodules.json`` links each nodule.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np

# HU -> byte knots: the page inverts the same curve, so they are written into it
HU_KNOTS = (-1024.0, -224.0, 288.0, 1368.0)
CODE_KNOTS = (0.0, 100.0, 228.0, 255.0)
WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)}  # (level, width) HU
JPEG_QUALITY = 75


def to_codes(hu_slice: np.ndarray) -> np.ndarray:
    """HU of one slice -> bytes by the viewer's curve (``HU_KNOTS`` -> ``CODE_KNOTS``)."""
    return np.rint(np.interp(hu_slice.astype(np.float32), HU_KNOTS, CODE_KNOTS)).astype(np.uint8)


def _jpeg(codes: np.ndarray, quality: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(codes).save(buf, format="JPEG", quality=quality, optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _outline(labels: np.ndarray, cand) -> dict[str, list[int]]:
    """``{slice: [row * width + col, ...]}``: the pixels of the candidate with a 4-neighbour outside it."""
    from scipy.ndimage import binary_erosion

    (zs, ys, xs), mask = cand.region
    width = labels.shape[2]
    # erode in-plane only: every slice of the candidate keeps its own outline
    cross = np.zeros((1, 3, 3), dtype=bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    edge = mask & ~binary_erosion(np.pad(mask, ((0, 0), (1, 1), (1, 1))), structure=cross)[:, 1:-1, 1:-1]
    out = {}
    for k, plane in enumerate(edge):
        rows, cols = np.nonzero(plane)
        if rows.size:
            out[str(zs.start + k)] = ((rows + ys.start) * width + cols + xs.start).tolist()
    return out


def _finding(labels, cand, k: int, threshold: float) -> dict:
    p = cand.probability
    return {
        "n": k + 1,
        "slice": int(min(max(round(cand.center_irc[0]), 0), labels.shape[0] - 1)),
        "irc": [round(float(v), 1) for v in cand.center_irc],
        "xyz": [round(float(v), 1) for v in cand.center_xyz],
        "diameter_mm": round(float(cand.diameter_mm), 1),
        "probability": None if math.isnan(p) else round(float(p), 3),
        "reported": bool(not math.isnan(p) and p >= threshold),
        "outline": _outline(labels, cand) if labels is not None else {},
    }


def viewer_document(ct, labels: np.ndarray | None, candidates, *, threshold: float = 0.5,
                    quality: int = JPEG_QUALITY, title: str | None = None) -> str:
    """The viewer page of one scan.

    Args:
        ct: the :class:`~nodulekit.data.volume.CTVolume`.
        labels: its candidate label volume (``None``: no outlines).
        candidates: :class:`~nodulekit.detect.candidates.Finding` s, most probable first.
        threshold: probability from which a candidate counts as a reported nodule.
        quality: JPEG quality of the slices.
        title: page title (default: the seriesuid).
    """
    data = {
        "uid": ct.seriesuid,
        "shape": list(ct.shape),
        "spacing": [float(v) for v in ct.spacing],
        "z_mm": [round(float(ct.voxel_to_world((k, 0, 0))[2]), 2) for k in range(ct.shape[0])],
        "threshold": threshold,
        "hu_knots": HU_KNOTS,
        "code_knots": CODE_KNOTS,
        "windows": WINDOWS,
        "findings": [_finding(labels, c, k, threshold) for k, c in enumerate(candidates)],
        "slices": [_jpeg(to_codes(np.asarray(ct.hu[k])), quality) for k in range(ct.shape[0])],
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    name = title or ct.seriesuid
    return (_PAGE.replace("__TITLE__", _escape(name)).replace("__DATA__", payload))


def write_viewer(ct, labels: np.ndarray | None, candidates, path: str | Path, **kwargs) -> Path:
    """Write :func:`viewer_document` to ``path`` (atomically)."""
    from nodulekit.io import atomic_write_text

    return atomic_write_text(path, viewer_document(ct, labels, candidates, **kwargs))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<link rel="icon" href="data:,">
<title>__TITLE__ - nodulekit</title>
<style>
body{margin:0;font:14px system-ui,sans-serif;background:#111;color:#ddd}
header{padding:6px 10px;background:#222;display:flex;gap:14px;align-items:center;flex-wrap:wrap}
header h1{font-size:15px;margin:0;font-weight:600}
main{display:flex;gap:12px;padding:10px;align-items:flex-start}
#view{position:relative}
canvas{display:block;background:#000;image-rendering:pixelated}
#slider{width:100%}
#counter{font-variant-numeric:tabular-nums}
button{background:#333;color:#ddd;border:1px solid #555;padding:3px 9px;cursor:pointer}
button.on{background:#3a6ea5;border-color:#3a6ea5;color:#fff}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:3px 7px;border-bottom:1px solid #333;text-align:right}
tbody tr{cursor:pointer}tbody tr:hover{background:#2a2a2a}tr.sel{background:#3a3a22}
tr.below{color:#888}.sw{display:inline-block;width:10px;height:10px;margin-right:4px}
#legend{font-size:12px;color:#aaa}
</style></head><body>
<header><h1>__TITLE__</h1>
<span id="counter" data-slice="0"></span>
<span>window <button id="w-lung" class="on">lung</button> <button id="w-mediastinum">mediastinum</button></span>
<label><input type="checkbox" id="all"> candidates below threshold</label>
<span id="legend">outline colour: probability 0 <span class="sw" style="background:hsl(220,100%,55%)"></span>
<span class="sw" style="background:hsl(110,100%,55%)"></span><span class="sw" style="background:hsl(0,100%,55%)"></span> 1</span>
</header>
<main><div id="view"><canvas id="canvas"></canvas><input type="range" id="slider" min="0" value="0"></div>
<div><table id="table"><thead><tr><th>#</th><th>slice</th><th>x mm</th><th>y mm</th><th>z mm</th>
<th>diam. mm</th><th>prob.</th></tr></thead><tbody></tbody></table><p id="none"></p></div></main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const [N, H, W] = D.shape;
const canvas = document.getElementById("canvas"), ctx = canvas.getContext("2d");
const slider = document.getElementById("slider"), counter = document.getElementById("counter");
const scratch = document.createElement("canvas"), sctx = scratch.getContext("2d", {willReadFrequently: true});
canvas.width = scratch.width = W; canvas.height = scratch.height = H;
const cssW = Math.min(720, window.innerWidth - 420, W * 2);
canvas.style.width = Math.max(cssW, 256) + "px";
canvas.style.height = Math.max(cssW, 256) * (H * D.spacing[1]) / (W * D.spacing[0]) + "px";
slider.max = N - 1;
// byte -> HU: the inverse of the curve the slices were encoded with
const codeHU = new Float32Array(256);
for (let c = 0; c < 256; c++) {
  const k = c <= D.code_knots[1] ? 0 : c <= D.code_knots[2] ? 1 : 2;
  const t = (c - D.code_knots[k]) / (D.code_knots[k + 1] - D.code_knots[k]);
  codeHU[c] = D.hu_knots[k] + t * (D.hu_knots[k + 1] - D.hu_knots[k]);
}
let lut = new Uint8ClampedArray(256), current = 0, showAll = false;
function setWindow(name) {
  const [level, width] = D.windows[name];
  for (let c = 0; c < 256; c++) lut[c] = 255 * (codeHU[c] - (level - width / 2)) / width;
  for (const w of Object.keys(D.windows)) document.getElementById("w-" + w).classList.toggle("on", w === name);
  draw();
}
const images = new Array(N).fill(null);
function image(k) {
  if (!images[k]) {
    const img = new Image();
    img.onload = () => { if (k === current) draw(); };
    img.src = "data:image/jpeg;base64," + D.slices[k];
    images[k] = img;
  }
  return images[k];
}
function colour(p) { return p === null ? "hsl(0,0%,80%)" : `hsl(${Math.round(220 * (1 - p))},100%,55%)`; }
function visible(f) { return showAll || f.reported; }
function draw() {
  const k = current, img = image(k);
  for (const j of [k + 1, k - 1, k + 2, k - 2]) if (j >= 0 && j < N) image(j);
  counter.textContent = `slice ${k + 1} / ${N}  z ${D.z_mm[k].toFixed(1)} mm`;
  counter.dataset.slice = k;
  slider.value = k;
  if (!img.complete || !img.naturalWidth) return;
  sctx.drawImage(img, 0, 0);
  const px = sctx.getImageData(0, 0, W, H), a = px.data;
  for (let i = 0; i < a.length; i += 4) { const g = lut[a[i]]; a[i] = a[i + 1] = a[i + 2] = g; a[i + 3] = 255; }
  ctx.putImageData(px, 0, 0);
  for (const f of D.findings) {
    const pts = f.outline[k];
    if (!pts || !visible(f)) continue;
    ctx.fillStyle = colour(f.probability);
    for (const q of pts) ctx.fillRect(q % W, Math.floor(q / W), 1, 1);
  }
  canvas.dataset.drawn = k;  // the slice on screen (tests wait for it)
}
function show(k) { current = Math.min(Math.max(k | 0, 0), N - 1); draw(); }
function table() {
  const body = document.querySelector("#table tbody");
  body.textContent = "";
  const rows = D.findings.filter(visible);
  for (const f of rows) {
    const tr = document.createElement("tr");
    tr.dataset.slice = f.slice;
    if (!f.reported) tr.className = "below";
    const p = f.probability === null ? "-" : f.probability.toFixed(3);
    const cells = [f.n, f.slice + 1, f.xyz[0].toFixed(1), f.xyz[1].toFixed(1), f.xyz[2].toFixed(1),
                   f.diameter_mm.toFixed(1), p];
    cells.forEach((v, i) => {
      const td = document.createElement("td");
      if (i === 0) { const s = document.createElement("span"); s.className = "sw"; s.style.background = colour(f.probability); td.append(s); }
      td.append(String(v)); tr.append(td);
    });
    tr.addEventListener("click", () => {
      for (const r of body.children) r.classList.remove("sel");
      tr.classList.add("sel");
      show(f.slice);
    });
    body.append(tr);
  }
  document.getElementById("none").textContent = rows.length ? "" :
    `no candidate with probability >= ${D.threshold}` + (D.findings.length ? " (tick the box to see the others)" : "");
}
slider.addEventListener("input", () => show(+slider.value));
canvas.addEventListener("wheel", (e) => { e.preventDefault(); show(current + Math.sign(e.deltaY)); }, {passive: false});
document.addEventListener("keydown", (e) => {
  if (e.key === "ArrowUp" || e.key === "PageUp") show(current - 1);
  if (e.key === "ArrowDown" || e.key === "PageDown") show(current + 1);
});
for (const w of Object.keys(D.windows)) document.getElementById("w-" + w).addEventListener("click", () => setWindow(w));
document.getElementById("all").addEventListener("change", (e) => { showAll = e.target.checked; table(); draw(); });
function fromHash() {
  const m = /slice=(\d+)/.exec(location.hash);
  return m ? +m[1] : null;
}
window.addEventListener("hashchange", () => { const k = fromHash(); if (k !== null) show(k); });
const first = D.findings.find((f) => f.reported);
current = fromHash() ?? (first ? first.slice : Math.floor(N / 2));
table();
setWindow("lung");
</script></body></html>
"""
