"""GB/s against size: one row of panels per op (forward, backward, fwd+bwd),
one line per implementation (colour, legend at the row's end) and dtype (line
style), the copy roofline in black and x.clone() in grey. GB/s on a log
scale: a cached copy runs 20-40x faster than any op that writes a new
tensor, and on a linear scale every op would lie flat at the bottom."""

from typing import List

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

from .results import PHASES, Row  # noqa: E402
from .table import size_label  # noqa: E402

DTYPE_STYLES = {"fp32": "-", "bf16": "--", "fp16": ":"}


def _line(ax, rows: List[Row], **style) -> None:
    rows = sorted(rows, key=lambda r: r.size)
    ax.plot([r.size for r in rows], [r.gbps for r in rows], marker="o", markersize=3, **style)


def plot_run(run: dict, path: str) -> None:
    """The plot of a benchmark run (bench.py's result, or a results file read back)."""
    env = run["environment"]
    plot(run["rows"], f"{env['device_name']}, torch {env['torch']}, p = {run['method']['p']}", path)


def plot(rows: List[Row], title: str, path: str) -> None:
    timed = [r for r in rows if r.timed]
    ops = list(dict.fromkeys(r.op for r in timed if r.kind != "copy"))
    dtypes = list(dict.fromkeys(r.dtype for r in timed))
    sizes = sorted({r.size for r in timed})

    fig, axes = plt.subplots(
        len(ops), len(PHASES), figsize=(5.5 * len(PHASES), 3.2 * len(ops)), squeeze=False
    )
    for axes_row, op in zip(axes, ops):
        labels = list(dict.fromkeys(r.implementation for r in timed if r.op == op))
        colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
        for ax, phase in zip(axes_row, PHASES):
            for dtype in dtypes:
                for variant, colour in (("copy", "black"), ("clone", "grey")):
                    reference = [r for r in timed if r.variant == variant and r.dtype == dtype]
                    _line(ax, reference, color=colour, linestyle=DTYPE_STYLES[dtype], linewidth=2)
                for label in labels:
                    mine = [
                        r
                        for r in timed
                        if (r.op, r.phase, r.dtype, r.implementation) == (op, phase, dtype, label)
                    ]
                    _line(ax, mine, color=colours[label], linestyle=DTYPE_STYLES[dtype])
            ax.set_title(f"{op}: {phase}", fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [size_label(s) for s in sizes])
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3, which="both")
        handles = [
            plt.Line2D([], [], color="black", linewidth=2, label="y.copy_(x)"),
            plt.Line2D([], [], color="grey", linewidth=2, label="x.clone()"),
        ]
        handles += [plt.Line2D([], [], color=colours[label], label=label) for label in labels]
        handles += [
            plt.Line2D([], [], color="black", linewidth=1, linestyle=DTYPE_STYLES[d], label=d) for d in dtypes
        ]
        axes_row[-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.suptitle(title, fontsize=11, y=1.01)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
