"""The promise of the fused ops, checked: every row of ours at or above the
fastest native route, measured side by side in one run. A benchmark check,
not a timed test: timings are noisy, so CI does not run it.

    python benchmarks/bench.py --check                  # measure (64K and 16M on CPU), then judge
    python benchmarks/native_check.py FILE.json         # judge a results file

Routes are judged against the native routes called the same way, so that
neither side is charged for an autograd engine the other skips:
- ``module`` (regdrop_ext's module, through autograd) against the fastest of
  ``eager`` and ``compile`` (the PyTorch expression, through autograd);
- ``raw`` (torch.ops.regdrop, called directly) against ``aten`` (the native
  kernels, called directly), where there is one.
The fastest native route is the one with the fastest round (runner.py).
The ratio judged is paired by round: the median over the interleaved rounds
of its round time over ours, each pair timed back to back. On a shared
machine the fastest rounds of two routes can fall in different states of
the machine (16M rows vary by 10-25% from round to round here); a pair of
one round shares its state. Files without rounds are judged by the times.
The low-memory variant, which draws its mask again in backward by design,
is not judged. Exits 1 if any row falls short of ``min_ratio`` x the
fastest native route, or if nothing could be judged.

A row that falls short is also placed against what bounds it, from the
same run:
- ``x.clone()``'s pace (GB/s, bytes counted alike): one read and one write
  into new memory. A single pass into fresh pages cannot beat it, since
  the OS zeroes each page at its first touch; a row at 90% of it or more
  is at that floor, as its native routes are;
- for a route through autograd, the time of our op called alone (the raw
  route), and its ratio to the aten kernel where there is one: the rest of
  the route's time is the autograd engine's, which native routes pay too.
"""

import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.results import Row, read_json  # noqa: E402
from benchmarks.table import size_label  # noqa: E402

# Which native routes each of our routes is judged against.
JUDGED = {"module": ("eager", "compile"), "raw": ("aten",)}


def _us(ms: float) -> str:
    return f"{ms * 1e3:.4g} us" if ms < 1 else f"{ms:.4g} ms"


def paired_ratio(mine: Row, native: Row) -> Tuple[float, str]:
    """(native's time over ours, paired by round where both have rounds; how)."""
    if mine.round_ms and native.round_ms and len(mine.round_ms) == len(native.round_ms):
        pairs = [n / m for n, m in zip(native.round_ms, mine.round_ms)]
        ahead = sum(p >= 1 for p in pairs)
        return statistics.median(pairs), f"round by round: ours ahead in {ahead} of {len(pairs)}"
    return native.time_ms / mine.time_ms, "by time"


# A row at this share of x.clone()'s pace or more is at the fresh-page floor.
CLONE_FLOOR = 0.9


def bounds(mine: Row, routes: Dict[str, Row], clone: Optional[Row] = None) -> str:
    """What bounds a row that falls short, from the same run: x.clone()'s
    pace, and, through autograd, the time of the op called alone."""
    notes = []
    if clone is not None and clone.gbps and mine.gbps:
        share = mine.gbps / clone.gbps
        notes.append(f"{share:.0%} of x.clone()'s pace" + (": at the fresh-page floor" if share >= CLONE_FLOOR else ""))
    if mine.variant == "module" and "raw" in routes:
        note = f"the op alone {_us(routes['raw'].time_ms)} of the route's {_us(mine.time_ms)}"
        if "aten" in routes:
            note += f", {paired_ratio(routes['raw'], routes['aten'])[0]:.2f}x aten's kernel"
        notes.append(note)
    return "; ".join(notes)


def shortfalls(rows: Sequence[Row], min_ratio: float = 1.0) -> Tuple[List[str], List[str]]:
    """(a line per judged row, the rows that fall short) for the rows of one run."""
    cells: Dict[tuple, Dict[str, Row]] = {}
    clones = {(r.size, r.dtype): r for r in rows if r.timed and r.variant == "clone"}
    for r in rows:
        if r.timed and r.kind != "copy":
            cells.setdefault((r.op, r.phase, r.dtype, r.size), {})[r.variant] = r
    lines, short = [], []
    for (op, phase, dtype, size), routes in sorted(cells.items(), key=lambda kv: (kv[0][3], kv[0][:3])):
        for ours, natives in JUDGED.items():
            native = [routes[v] for v in natives if v in routes]
            if ours not in routes or not native:
                continue
            mine, fastest = routes[ours], min(native, key=lambda r: r.time_ms)
            ratio, how = paired_ratio(mine, fastest)
            line = (
                f"{op} {phase} {dtype} {size_label(size)}: {mine.implementation} {_us(mine.time_ms)} "
                f"vs {fastest.implementation} {_us(fastest.time_ms)}: {ratio:.2f}x ({how})"
            )
            lines.append(line + ("" if ratio >= min_ratio else "  SHORT"))
            if ratio < min_ratio:
                bound = bounds(mine, routes, clones.get((size, dtype)))
                short.append(line + (f" [{bound}]" if bound else ""))
    if not lines:
        short.append("no row of ours with a native route timed in the same run")
    return lines, short


def report(rows: Sequence[Row], min_ratio: float = 1.0) -> int:
    """Print the judged rows and the shortfalls; 1 if there are any."""
    lines, short = shortfalls(rows, min_ratio)
    print("\n".join(lines))
    if short:
        print(f"\n{len(short)} below {min_ratio:g}x the fastest native route:\n  " + "\n  ".join(short))
        at_floor = sum("fresh-page floor" in line for line in short)
        print(f"{at_floor} of them at {CLONE_FLOOR:.0%} of x.clone()'s pace or more (the floor of a pass into new memory)")
        return 1
    print(f"\nevery row at or above {min_ratio:g}x the fastest native route")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="a results JSON file (bench.py --json)")
    parser.add_argument("--min-ratio", type=float, default=1.0)
    args = parser.parse_args(argv)
    return report(read_json(args.results)["rows"], args.min_ratio)


if __name__ == "__main__":
    sys.exit(main())
