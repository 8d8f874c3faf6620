"""The CPU kernels' own speed, and its limit: kernel_speed.cpp (the kernels
alone, into memory touched beforehand) built with the extension's flags and
run side by side with a Philox-only call (the mask bytes drawn, nothing else
read or written) and a copy of the same bytes. Needs no torch.

    python benchmarks/kernel_speed.py                        # 16M elements, 1 and 2 threads, fp32 and bf16
    python benchmarks/kernel_speed.py --sizes 64K,16M --threads 2 --isa avx2

Per dtype and thread count it prints each mode's best time over the runs
(wall clock, and the process's CPU time, which a shared machine disturbs
less), then how far dropout is from the Philox-only limit and from the copy.
The modes take turns, round by round, so that a noisy stretch of a shared
machine falls on all of them rather than on one.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ([ROOT / "benchmarks/kernel_speed.cpp"] + sorted((ROOT / "csrc/cpu").glob("kernels_*.cpp"))
           + [ROOT / f"csrc/cpu/norm_{isa}.cpp" for isa in ("baseline", "avx2", "avx512")])
# setup.py's flags: no FMA contraction, as every build of the kernels.
FLAGS = ["-O3", "-ffp-contract=off", "-Wno-psabi", "-std=c++20", "-fopenmp"]
MODES = ("philox", "dropout", "dropout_add", "copy")


def parse_size(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def build() -> Path:
    """build/kernel_speed, rebuilt when a source or a header it reads is newer."""
    binary = ROOT / "build" / "kernel_speed"
    inputs = SOURCES + [p for d in ("csrc", "csrc/cpu", "csrc/norm", "csrc/cuda") for p in (ROOT / d).glob("*.h")]
    if binary.exists() and binary.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return binary
    compiler = os.environ.get("CXX") or shutil.which("c++") or "g++"
    binary.parent.mkdir(exist_ok=True)
    subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(binary)], check=True)
    return binary


def measure(binary: Path, mode: str, dtype: str, size: int, threads: int, repeats: int, isa: str):
    """(best wall ms, best CPU ms) of `repeats` runs."""
    args = [str(binary), mode, dtype, str(size), str(threads), str(repeats)] + ([isa] if isa else [])
    fields = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()
    values = dict(zip(fields[4::2], map(float, fields[5::2])))
    return values["best_ms"], values["cpu_best_ms"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="16M", help="elements, comma-separated, K/M suffixes (default: 16M)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=10, help="runs per round and mode")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of every mode in turn; the best run kept")
    parser.add_argument("--isa", default="", help="avx512, avx2 or baseline (default: the widest this CPU has)")
    args = parser.parse_args(argv)
    binary = build()
    print(f"{'size':>6} {'dtype':<5} {'threads':>7}  " + "  ".join(f"{m + ' ms':>16}" for m in MODES)
          + "  dropout/philox  dropout/copy   (wall | CPU)")
    for size in map(parse_size, args.sizes.split(",")):
        for dtype in args.dtypes.split(","):
            for threads in map(int, args.threads.split(",")):
                t = {m: (float("inf"), float("inf")) for m in MODES}
                for _ in range(args.rounds):
                    for m in MODES:
                        best = measure(binary, m, dtype, size, threads, args.repeats, args.isa)
                        t[m] = tuple(map(min, t[m], best))
                ratio = [f"{t['dropout'][k] / t['philox'][k]:.2f}" for k in (0, 1)]
                to_copy = [f"{t['dropout'][k] / t['copy'][k]:.2f}" for k in (0, 1)]
                label = f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"
                print(f"{label:>6} {dtype:<5} {threads:>7}  "
                      + "  ".join(f"{t[m][0]:7.3f} |{t[m][1]:7.3f}" for m in MODES)
                      + f"  {ratio[0]:>6} |{ratio[1]:>6}  {to_copy[0]:>5} |{to_copy[1]:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
