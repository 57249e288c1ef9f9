"""How the RK3588 compiler's weight memory grows with the U-Net's widths, measured on real builds.

Builds the int8 (toolkit w8a8) RKNN of U-Nets of several widths (random weights, which do not change
the weight memory) at the deployed 512x512 input (a smaller input changes it by a few KiB), reads
each build log's Total Weight Memory, and compares it with
:func:`nodulekit.optimize.search.npu_weight_kib` under channel-packing hypotheses. Needs
``.venv-rknn`` (``make rknn``).

Usage:
    python scripts/npu_memory_fit.py [--size 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from nodulekit.deploy.export import export_onnx
from nodulekit.deploy.rknn import build_rknn
from nodulekit.models.unet import SegModel, UNetWidths
from nodulekit.optimize.search import npu_weight_kib, widths_for

BASE = UNetWidths.default()
CONFIGS = {
    "baseline": {},
    "pruned (8/16/24, up 16/8)": {"down_path.0": 8, "down_path.1": 16, "down_path.2": 24, "up_path.0": 16,
                                  "up_path.1": 8},
    "down_path.2=32": {"down_path.2": 32},
    "down_path.2=16": {"down_path.2": 16},
    "down_path.0=8, up_path.1=8": {"down_path.0": 8, "up_path.1": 8},
    "all 8": {"down_path.0": 8, "down_path.1": 8, "down_path.2": 8, "up_path.0": 8, "up_path.1": 8},
    "16/24/40, up 24/16": {"down_path.0": 16, "down_path.1": 24, "down_path.2": 40, "up_path.0": 24,
                           "up_path.1": 16},
}
HYPOTHESES = {f"align out {o}, in {i}": {"align_out": o, "align_in": i, "overhead_kib": 0.0, "bias_bytes": 4}
              for o, i in ((1, 1), (8, 8), (16, 16), (32, 32))}
HYPOTHESES["the search's estimate"] = {}


def build(widths: UNetWidths, work: Path, quantize: bool, size: int) -> float:
    torch.manual_seed(0)
    model = SegModel(widths).eval()
    onnx_path = work / "seg.onnx"
    export_onnx(model, onnx_path, input_shape=(1, 7, size, size), dynamic=False)
    rng = np.random.default_rng(0)
    dataset = [rng.uniform(-1000, 1000, (1, 7, size, size)).astype(np.float32) for _ in range(2)]
    res = build_rknn(onnx_path, work / "seg.rknn", quantize=quantize, dataset=dataset if quantize else None,
                     input_size=(1, 7, size, size))
    return float(res["weight_memory_kib"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--size", type=int, default=512, help="input slice side")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, choice in CONFIGS.items():
            widths = widths_for(BASE, choice)
            row = {"config": name, "widths": widths.to_dict(),
                   "int8_kib": build(widths, Path(tmp), quantize=True, size=args.size)}
            if name == "baseline":
                row["fp16_kib"] = build(widths, Path(tmp), quantize=False, size=args.size)
            row["estimates"] = {h: round(npu_weight_kib(widths, **kw), 2) for h, kw in HYPOTHESES.items()}
            rows.append(row)
            print(name, row["int8_kib"], row.get("fp16_kib", ""), row["estimates"], flush=True)
    print("\n| config | int8 build (KiB) | " + " | ".join(HYPOTHESES) + " |")
    print("| --- | ---: |" + " ---: |" * len(HYPOTHESES))
    for r in rows:
        cells = [f"{r['estimates'][h]:.2f} ({100 * (r['estimates'][h] / r['int8_kib'] - 1):+.0f} %)" for h in HYPOTHESES]
        print(f"| {r['config']} | {r['int8_kib']:.2f} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
