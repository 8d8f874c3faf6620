"""The README's benchmark table, rendered from results files only:

    python benchmarks/report.py benchmarks/results/*.json
    python benchmarks/report.py --phases forward,fwd+bwd --dtypes fp32,bf16 FILE.json
    python benchmarks/report.py --plot FILE.png FILE.json      # and its plot (benchmarks/plot.py)

Per file: where it ran, then one line per op, phase and dtype (all, or those
asked for) at the largest size measured: regdrop_ext's module (as a model calls it) against the eager
PyTorch expression it replaces and the fastest native route (eager,
torch.compile or an aten kernel), its share of copy bandwidth, and the bytes
each saves for backward per element; then the norm family's rows, where the
file has them (bench.py --norm) or is made of them (norm_rows.py --json).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ""):
    # Run as a script: import this folder as the `benchmarks` package. The
    # repository root goes last, so an installed regdrop_ext is the one used.
    sys.path.pop(0)
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.results import PHASES, Row, read_json  # noqa: E402
from benchmarks.table import size_label  # noqa: E402


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _bytes(value: float) -> str:
    return f"{value:.3g}"


def _headline_rows(rows: List[Row], phases: Optional[Sequence[str]], dtypes: Optional[Sequence[str]]):
    """(ours, eager, fastest native) per op, phase and dtype at the largest size."""
    timed = [
        r
        for r in rows
        if r.timed
        and r.kind != "copy"
        and (phases is None or r.phase in phases)
        and (dtypes is None or r.dtype in dtypes)
    ]
    size = max((r.size for r in timed), default=None)
    cells = {}
    for row in timed:
        if row.size == size:
            cells.setdefault((row.op, row.phase, row.dtype), []).append(row)
    ops = list(dict.fromkeys(r.op for r in timed))
    for key in sorted(cells, key=lambda k: (ops.index(k[0]), PHASES.index(k[1]), k[2])):
        cell = cells[key]
        ours = [r for r in cell if r.variant == "module"]
        eager = [r for r in cell if r.variant == "eager"]
        native = [r for r in cell if r.kind in ("eager", "native")]
        if ours and eager and native:
            yield ours[0], eager[0], min(native, key=lambda r: r.time_ms)


def markdown(run: dict, phases: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None) -> str:
    env, method = run["environment"], run["method"]
    rows = run["rows"]
    headline = list(_headline_rows(rows, phases, dtypes))
    if not headline:
        return "(no timed regdrop_ext module and eager rows to compare)"
    size = headline[0][0].size
    lines = [
        f"**{env['device_name']}** ({env['device']}, {env['threads']} threads, "
        f"CPU capability {env['cpu_capability']}"
        + (", THP_MEM_ALLOC_ENABLE=1" if env.get("thp_mem_alloc") else "")
        + (f", MALLOC_MMAP_THRESHOLD_={env['malloc_mmap_threshold']}" if env.get("malloc_mmap_threshold") else "")
        + (f", MALLOC_TRIM_THRESHOLD_={env['malloc_trim_threshold']}" if env.get("malloc_trim_threshold") else "")
        + (f", LD_PRELOAD={env['preloaded_malloc']}" if env.get("preloaded_malloc") else "")
        + f"), torch {env['torch']}, {env['date'][:10]}. "
        f"{size:,} elements ({size_label(size)}), p = {method['p']}, {method['timer']}.",
        "",
        "| op | phase | dtype | regdrop_ext ms | eager ms | fastest native ms "
        "| vs eager | vs fastest native | % of copy | saved B/elem: ours / eager |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ours, eager, fastest in headline:
        lines.append(
            f"| {ours.op} | {ours.phase} | {ours.dtype} | {_ms(ours.time_ms)} "
            f"| {_ms(eager.time_ms)} | {_ms(fastest.time_ms)} ({fastest.implementation}) "
            f"| {ours.vs_eager:.2f}x | {ours.vs_fastest_native:.2f}x | {ours.pct_copy:.0f}% "
            f"| {_bytes(ours.saved_bytes_per_element)} / {_bytes(eager.saved_bytes_per_element)} |"
        )
    references = sorted(
        (r for r in rows if r.kind == "copy" and r.timed and r.size == size and (dtypes is None or r.dtype in dtypes)),
        key=lambda r: (r.dtype, r.variant != "copy"),
    )
    lines += [
        "",
        "References, same size: "
        + "; ".join(f"{r.implementation} {r.dtype} {_ms(r.time_ms)} ms ({r.gbps:.0f} GB/s)" for r in references)
        + ". % of copy is against y.copy_(x); x.clone() writes a new tensor, as the ops do.",
    ]
    e2e = run.get("e2e")
    if e2e:
        cfg, native, mine = e2e["config"], e2e["native"], e2e["regdrop_ext"]
        test = e2e["loss_test"]
        lines += [
            "",
            f"Transformer block (width {cfg['width']}, {cfg['heads']} heads, MLP {cfg['mlp_ratio']}x, "
            f"batch {cfg['batch']} x {cfg['tokens']} tokens), forward+backward step: "
            f"{_ms(mine['step_ms'])} ms with regdrop_ext vs {_ms(native['step_ms'])} ms native "
            f"({native['step_ms'] / mine['step_ms']:.2f}x); saved for backward "
            f"{mine['saved_bytes'] / 2**20:.1f} MB vs {native['saved_bytes'] / 2**20:.1f} MB"
            + (
                f"; peak {mine['peak_bytes'] / 2**20:.0f} MB vs {native['peak_bytes'] / 2**20:.0f} MB"
                if mine["peak_bytes"]
                else ""
            )
            + f"; loss curves over {cfg['steps']} steps "
            + ("alike" if test["alike"] else "NOT alike")
            + f" (mean difference {test['mean_difference']:+.4f}, bound {test['bound']:.4f}).",
        ]
    return "\n".join(lines)


def norm_markdown(results: List[dict]) -> str:
    """The norm family's rows (norm_rows.py) in markdown: per norm, phase and
    dtype, ours against eager and compile."""
    cells = {}
    for row in results:
        cells.setdefault((row["norm"], row["phase"], row["dtype"]), {})[row["implementation"]] = row
    lines = ["| norm | phase | dtype | regdrop_ext ms | eager ms | torch.compile ms | vs eager | vs compile | "
             "saved B/elem: ours / eager / compile |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (norm, phase, dtype), impls in cells.items():
        ours = next(v for k, v in impls.items() if k.startswith("regdrop_ext"))
        compiled = next(v for k, v in impls.items() if k.startswith("torch.compile"))
        eager = next(v for k, v in impls.items() if k.startswith("F."))
        lines.append(
            f"| {'LayerNorm' if norm == 'layer' else 'RMSNorm'} | {phase} | {dtype} | {ours['median_ms']:.3g} | "
            f"{eager['median_ms']:.3g} | {compiled['median_ms']:.3g} | "
            f"{eager['median_ms'] / ours['median_ms']:.2f}x | {compiled['median_ms'] / ours['median_ms']:.2f}x | "
            f"{ours['saved_bytes_per_element']:.3g} / {eager['saved_bytes_per_element']:.3g} / "
            f"{compiled['saved_bytes_per_element']:.3g} |")
    return "\n".join(lines)


def render_file(path: str, phases: Optional[Sequence[str]], dtypes: Optional[Sequence[str]]) -> str:
    """A results file in markdown: op rows (bench.py, with its norm rows
    where it has them), or norm rows alone (norm_rows.py --json)."""
    with open(path) as src:
        run = json.load(src)
    if run["rows"] and "norm" in run["rows"][0]:
        return f"{path}: {run['environment']['device_name']}, {run['environment']['date'][:10]}\n\n" + norm_markdown(
            run["rows"])
    text = markdown(read_json(path), phases, dtypes)
    return text + ("\n\n" + norm_markdown(run["norm"]) if run.get("norm") else "")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON files")
    parser.add_argument("--phases", help=f"comma-separated, of {','.join(PHASES)} (default: all)")
    parser.add_argument("--dtypes", help="comma-separated, e.g. fp32,bf16 (default: all)")
    parser.add_argument("--plot", metavar="PATH", help="plot the one results file given (PNG, SVG or PDF)")
    args = parser.parse_args(argv)
    if args.plot:
        if len(args.results) != 1:
            parser.error("--plot takes one results file")
        from benchmarks.plot import plot_run

        plot_run(read_json(args.results[0]), args.plot)
    phases = args.phases.split(",") if args.phases else None
    dtypes = args.dtypes.split(",") if args.dtypes else None
    print("\n\n".join(render_file(path, phases, dtypes) for path in args.results))


if __name__ == "__main__":
    main()
