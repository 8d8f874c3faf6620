"""The console table: one aligned line per result row, grouped by op and phase."""

from typing import List, Optional

from .results import PHASES, Row

COLUMNS = (
    ("op", "<"),
    ("phase", "<"),
    ("implementation", "<"),
    ("dtype", "<"),
    ("size", ">"),
    ("median ms", ">"),
    ("IQR ms", ">"),
    ("GB/s", ">"),
    ("% copy", ">"),
    ("x eager", ">"),
    ("x fastest native", ">"),
    ("saved B/elem", ">"),
    ("check", "<"),
)


def size_label(n: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _number(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _milliseconds(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4g}"


def _check(row: Row) -> str:
    if row.check.passed:
        return "passed"
    return f"{'FAILED' if row.failed else 'not run'}: {row.check.error}"


def _cells(row: Row) -> List[str]:
    spread = "" if not row.timed else f"{_milliseconds(row.q25_ms)}-{_milliseconds(row.q75_ms)}"
    return [
        row.op,
        row.phase,
        row.implementation,
        row.dtype,
        size_label(row.size),
        _milliseconds(row.time_ms),
        spread,
        _number(row.gbps, 1),
        _number(row.pct_copy, 1),
        _number(row.vs_eager, 2),
        _number(row.vs_fastest_native, 2),
        _number(row.saved_bytes_per_element, 3),
        _check(row),
    ]


def render(rows: List[Row]) -> str:
    ops = list(dict.fromkeys(r.op for r in rows))
    ordered = sorted(rows, key=lambda r: (ops.index(r.op), PHASES.index(r.phase), r.dtype, r.size))
    lines = [[name for name, _ in COLUMNS]] + [_cells(r) for r in ordered]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    aligns = [align for _, align in COLUMNS]

    def format_line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths)).rstrip()

    out = [format_line(lines[0]), "  ".join("-" * w for w in widths)]
    previous = None
    for row, cells in zip(ordered, lines[1:]):
        group = (row.op, row.phase, row.dtype, row.size)
        if previous is not None and group[:2] != previous[:2]:
            out.append("")
        previous = group
        out.append(format_line(cells))
    return "\n".join(out)
