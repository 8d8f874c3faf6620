"""regdrop_ext against native PyTorch: validate every implementation, then
time it, then report GB/s against a copy timed in the same run.

    python benchmarks/bench.py --quick                # the README's command: under a minute on 2 cores
    python benchmarks/bench.py --e2e --json benchmarks/results/cpu.json --plot cpu.png
    python benchmarks/bench.py --check                # every row of ours at or above native (native_check.py)

Exits with status 1 if any implementation failed its check, or, with
--check, if any row of ours falls short of the fastest native route.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import this folder as the `benchmarks` package. The
    # repository root goes last, so an installed regdrop_ext is the one used.
    sys.path.pop(0)
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import e2e, environment, native_check, norm_rows, timing  # noqa: E402
from benchmarks.op_table import OPS  # noqa: E402
from benchmarks.plot import plot_run  # noqa: E402
from benchmarks.report import markdown, norm_markdown  # noqa: E402
from benchmarks.results import BYTES_RULE, VARIANTS, write_csv, write_json  # noqa: E402
from benchmarks.runner import DTYPE_NAMES, Settings, grid, run  # noqa: E402
from benchmarks.table import render, size_label  # noqa: E402

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# Latency-bound to bandwidth-bound; 128M = 16 x 2048 x 4096 is the anchor size.
FULL = {
    "sizes": {"cpu": "4K,64K,1M,16M", "cuda": "4K,64K,1M,16M,128M"},
    "dtypes": "fp32,bf16,fp16",
    "impls": ",".join(VARIANTS),
    "budget_s": {"cpu": 0.5, "cuda": 0.1},
    # Interleaved rounds (runner.py): the CPU drifts, a GPU at a fixed clock much less.
    "rounds": {"cpu": 5, "cuda": 1},
    "e2e_budget_s": 2.0,
}
# Under a minute on 2 CPU cores: each op's eager expression against our module.
QUICK = {
    "sizes": {"cpu": "4K,16M", "cuda": "4K,128M"},
    "dtypes": "fp32,bf16",
    "impls": "eager,module",
    "budget_s": {"cpu": 0.02, "cuda": 0.05},
    "rounds": {"cpu": 1, "cuda": 1},
    "e2e_budget_s": 0.25,
}
# Every native route beside ours, where allocation dominates (the largest
# size) and where the kernel does (64K).
CHECK = {
    "sizes": {"cpu": "64K,16M", "cuda": "64K,128M"},
    "dtypes": "fp32,bf16,fp16",
    "impls": "eager,compile,aten,module,raw",
    "budget_s": FULL["budget_s"],
    "rounds": FULL["rounds"],
    "e2e_budget_s": FULL["e2e_budget_s"],
}


def parse_size(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse_args(argv=None):
    ops = ",".join(op.key for op in OPS)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtypes", help=f"comma-separated, of {','.join(DTYPES)} (default: all; --quick: fp32,bf16)")
    parser.add_argument(
        "--sizes",
        help="elements, comma-separated, K/M suffixes allowed (default: 4K to 16M on CPU, to 128M on "
        "CUDA; --quick: 4K and the largest; --check: 64K and the largest)",
    )
    parser.add_argument("--ops", default=ops, help=f"comma-separated, of {ops} (default: all)")
    parser.add_argument(
        "--impls",
        help=f"implementation variants, comma-separated, of {','.join(VARIANTS)} "
        "(default: all; --quick: eager,module; --check: all but low_memory)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--p", type=float, default=0.1, help="drop probability (default: 0.1)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer sizes, dtypes and repeats")
    mode.add_argument(
        "--check",
        action="store_true",
        help="each row of ours against the fastest native route called the same way, at 64K and the "
        "largest size; prints the rows that fall short and exits 1 if there are any (benchmarks/native_check.py)",
    )
    parser.add_argument("--e2e", action="store_true", help="also time a transformer block's training step")
    parser.add_argument("--norm", action="store_true",
                        help="also time the norm family's rows: 8192 x 1024, LayerNorm and RMSNorm (norm_rows.py)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the result rows as CSV")
    parser.add_argument("--plot", metavar="PATH", help="plot GB/s against size (PNG, SVG or PDF)")
    return parser.parse_args(argv)


def _settings(args, preset: dict) -> Settings:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    return Settings(
        device=device,
        sizes=[parse_size(s) for s in (args.sizes or preset["sizes"][device.type]).split(",")],
        dtypes=[DTYPES[name] for name in (args.dtypes or preset["dtypes"]).split(",")],
        threads=torch.get_num_threads(),
        p=args.p,
        budget_s=preset["budget_s"][device.type],
        rounds=preset["rounds"][device.type],
    )


def _selection(args, preset: dict):
    """The ops and implementation variants asked for, each name checked."""
    ops = args.ops.split(",")
    variants = (args.impls or preset["impls"]).split(",")
    for option, names, known in (("--ops", ops, [op.key for op in OPS]), ("--impls", variants, list(VARIANTS))):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise SystemExit(f"{option}: unknown {unknown}, expected some of {known}")
    return [op for op in OPS if op.key in ops], variants


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = QUICK if args.quick else CHECK if args.check else FULL
    settings = _settings(args, preset)
    ops, variants = _selection(args, preset)
    torch.manual_seed(0)

    env = environment.describe(settings.device, settings.threads)
    method = {
        "timer": timing.describe(settings.device, settings.threads, settings.budget_s / settings.rounds)
        + f", in {settings.rounds} interleaved round(s) (each implementation of a cell in turn, then again); "
        "time: the median of the fastest round; IQR: of the runs of all rounds",
        "p": settings.p,
        "quick": args.quick,
        "bytes_rule": BYTES_RULE,
        "checks": "before timing, every implementation's output and gradients agree with a reference "
        "built from its own keep flags, and its keep rate is within 5 sigma (benchmarks/checks.py)",
    }
    runnable, notes = grid(ops, variants)
    print(environment.header(env))
    print(f"timing:   {method['timer']}")
    print(
        f"grid:     sizes {','.join(size_label(s) for s in settings.sizes)}; dtypes "
        f"{','.join(DTYPE_NAMES[d] for d in settings.dtypes)}; implementations {','.join(variants)}; "
        f"p = {settings.p}"
    )
    for note in notes:
        print(f"note:     {note}")
    print()

    cells = len(settings.sizes) * sum(len(impls) for op, impls in runnable for d in settings.dtypes if op.runs_for(d))
    with tqdm(total=cells, unit="impl", disable=None) as progress:
        rows, compiles = run(settings, runnable, progress)
    print(render(rows))
    print(f"\nbytes: {BYTES_RULE}")
    if compiles:
        print("\ntorch.compile, first forward+backward call (compiling, then one run):")
        for c in compiles:
            print(f"  {c['op']:<18}{c['dtype']:<6}{size_label(c['size']):>6}{c['seconds']:>8.2f} s")

    result = {"environment": env, "method": method, "notes": notes, "rows": rows, "compile": compiles}
    if args.e2e or args.quick:
        cpu = settings.device.type == "cpu"
        config = e2e.QUICK_CPU if args.quick and cpu else e2e.CONFIGS[settings.device.type]
        result["e2e"] = e2e.run(config, settings.p, settings.device, settings.threads, preset["e2e_budget_s"],
                                settings.rounds)
        print("\n" + e2e.summary(result["e2e"]))

    if args.norm and settings.device.type == "cpu":
        result["norm"] = norm_rows.run(8192, 1024, settings.dtypes, ("layer", "rms"), settings.p, settings.threads,
                                       settings.budget_s, settings.rounds)
        print("\n" + norm_markdown(result["norm"]))

    print("\nREADME table (python benchmarks/report.py FILE.json renders it from a results file):\n")
    print(markdown(result))
    if args.json:
        write_json(args.json, result)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        plot_run(result, args.plot)

    short = 0
    if args.check:
        print("\nEach row of ours against the fastest native route called the same way (native_check.py):\n")
        short = native_check.report(rows)
    failed = sorted({(r.op, r.implementation, r.dtype, r.size) for r in rows if r.failed})
    for op, label, dtype, size in failed:
        print(f"FAILED, not timed: {op} {label} {dtype} {size_label(size)}", file=sys.stderr)
    return 1 if failed or short else 0


if __name__ == "__main__":
    environment.pin_allocator()
    sys.exit(main())
