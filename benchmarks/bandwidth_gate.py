"""The bandwidth gate of the GPU acceptance run (gpu_check.sh): every op's
forward and backward, at the largest size in a results file, must reach a
share of the bandwidth of y.copy_(x) of the same size and dtype, timed in
the same run. A benchmark check, not a timed test.

    python benchmarks/bandwidth_gate.py cuda.json [--min-pct 85]

For each (op, phase, dtype) the best of our implementations counts (the raw
op and the module; the low-memory variant is reported, not gated). Exits 1
if any falls short, or if the file has no row to judge.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.results import read_json  # noqa: E402

GATED_PHASES = ("forward", "backward")


def shortfalls(rows, min_pct: float):
    """(lines to print, failures) for the rows of one results file."""
    largest = max((r.size for r in rows if r.kind == "ours" and r.timed), default=None)
    if largest is None:
        return [], ["no timed row of ours"]
    best = {}
    for r in rows:
        if r.kind == "ours" and r.variant in ("raw", "module") and r.size == largest and r.phase in GATED_PHASES:
            if r.pct_copy is not None:
                key = (r.op, r.phase, r.dtype)
                best[key] = max(best.get(key, 0.0), r.pct_copy)
    lines, failures = [], []
    for (op, phase, dtype), pct in sorted(best.items()):
        verdict = "ok" if pct >= min_pct else "BELOW"
        lines.append(f"{op:<18}{phase:<10}{dtype:<6}{pct:7.1f}% of copy  {verdict}")
        if pct < min_pct:
            failures.append(f"{op} {phase} {dtype}: {pct:.1f}% of copy < {min_pct}%")
    if not best:
        failures.append("no forward or backward row with a copy measured in the same run")
    return lines, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results")
    parser.add_argument("--min-pct", type=float, default=85.0)
    args = parser.parse_args(argv)
    lines, failures = shortfalls(read_json(args.results)["rows"], args.min_pct)
    print("\n".join(lines))
    if failures:
        print("\nbandwidth gate FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nbandwidth gate passed: every op at least {args.min_pct}% of copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
