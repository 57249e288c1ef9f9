"""How the two largest training loads of the demo use a second core, alone and side by side.

Times optimizer steps of the classifier (``LunaModel`` with its training batch norms, batch 16 of
32x48x48, channels-last) and of the pruned U-Net's fine-tuning (the study's default cut, batch 16 of
64x64 crops) on synthetic batches, each at 2 threads and at 1, then both at once on one thread
each (two processes). Repeats interleave the rows; medians are printed as JSON lines with the CPU
model and flags (``lscpu``). Run on an otherwise idle machine:

    python scripts/bench_train_threads.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def steps(which: str, threads: int, n: int) -> float:
    """Median seconds of ``n`` optimizer steps (after 3 untimed ones)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if which == "cls":
        from nodulekit.models.classifier import LunaModel

        model = LunaModel(norm=True).to(memory_format=torch.channels_last_3d)
        x = torch.randn(16, 1, 32, 48, 48).contiguous(memory_format=torch.channels_last_3d)
        y = torch.randint(0, 2, (16,))

        def loss_of():
            return F.cross_entropy(model(x)[0], y)
    else:
        from nodulekit.models.unet import SegModel
        from nodulekit.optimize.prune import prune_seg
        from nodulekit.optimize.study import StudyConfig

        model = prune_seg(SegModel(), StudyConfig.prune_ratio).to(memory_format=torch.channels_last)
        x = torch.randn(16, 7, 64, 64).contiguous(memory_format=torch.channels_last)
        target = (torch.rand(16, 1, 64, 64) > 0.9).float()

        def loss_of():
            return F.binary_cross_entropy(model(x), target)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    times = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _child(which: str, threads: int, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", which, str(threads), str(n)],
                            stdout=subprocess.PIPE, text=True)


def _cpu() -> dict:
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)"):
            info[key.strip()] = value.strip()
        elif key.strip() == "Flags":
            wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
            info["flags"] = [f for f in value.split() if f in wanted]
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (default 2)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        which, threads, n = args.child
        print(steps(which, int(threads), int(n)))
        return
    rows: dict[str, list[float]] = {}
    plan = (("cls", 2, 25), ("cls", 1, 25), ("seg", 2, 60), ("seg", 1, 60))
    for _ in range(args.repeats):
        for which, threads, n in plan:
            proc = _child(which, threads, n)
            rows.setdefault(f"{which} {threads} thread(s)", []).append(float(proc.communicate()[0]))
        # side by side: the U-Net runs enough steps to overlap the classifier's whole run
        both = [_child("cls", 1, 25), _child("seg", 1, 200)]
        for name, proc in zip(("cls 1 thread, beside seg", "seg 1 thread, beside cls"), both):
            rows.setdefault(name, []).append(float(proc.communicate()[0]))
    print(json.dumps({"cpu": _cpu()}))
    for name, values in rows.items():
        print(json.dumps({"row": name, "median_step_s": round(statistics.median(values), 4),
                          "runs": [round(v, 4) for v in values]}))


if __name__ == "__main__":
    main()
