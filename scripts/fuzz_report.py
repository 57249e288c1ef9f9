"""Run the hostile-input cases of ``tests/test_fuzz.py`` and print the counts table.

usage: PYTHONPATH=src python scripts/fuzz_report.py [--list] [--only SUBSTRING]

Every case runs; ``--list`` also prints
each case that did not end in a clean line or a named warning.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_fuzz  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print every case that failed, with its outcome")
    p.add_argument("--only", default="", help="run only the cases whose id holds this text")
    args = p.parse_args()
    outcomes: Counter = Counter()
    bad = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        assets = test_fuzz.build_assets(Path(tmp) / "assets")
        for k, case in enumerate(c for c in test_fuzz.ALL_CASES if args.only in c.id):
            if case.needs and case.needs not in assets.scans:
                continue
            try:
                outcome, run, res = test_fuzz.run_case(case, Path(tmp) / f"case{k}", assets)
            except Exception as exc:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
                outcome, res = "traceback", None
                print(f"{case.id}: cannot build ({type(exc).__name__}: {exc})", file=sys.stderr)
            outcomes[outcome] += 1
            ok = {"error": {"clean"}, "warn": {"warning"}, "either": {"clean", "warning"}}[case.expect]
            if outcome not in ok:
                last = "" if res is None else (res.stderr.strip().splitlines() or [""])[-1][:160]
                bad.append(f"{outcome:9s} {case.id}  rc={None if res is None else res.rc}  {last}")
    print(test_fuzz.counts_table(outcomes))
    print(f"\n{sum(outcomes.values())} cases in {time.perf_counter() - t0:.0f} s")
    if args.list:
        print("\n".join(["", *bad]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
