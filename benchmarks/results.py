"""Result rows, the columns derived from them, and the JSON and CSV files.

One row is one implementation of one op, in one phase (forward, backward or
forward+backward), at one size and dtype. ``variant`` says which
implementation it is (op_table.py) and ``kind`` whose: ``copy`` (the
references: ``y.copy_(x)``, the bandwidth roofline, and ``x.clone()``),
``eager`` (the PyTorch expression the op replaces), ``native`` (other
PyTorch routes) or ``ours``.
"""

import csv
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional

PHASES = ("forward", "backward", "fwd+bwd")

# Implementation variants, in table order, and whose each is.
VARIANTS = {
    "eager": "eager",
    "compile": "native",
    "aten": "native",
    "module": "ours",
    "low_memory": "ours",
    "raw": "ours",
}

BYTES_RULE = (
    "GB/s = bytes / median time, bytes = each distinct tensor the call reads or writes, once: "
    "its operands and results, plus (through autograd) the tensors it saves for backward, "
    "measured with saved_tensors_hooks. So a mask counts at its stored size: regdrop 1 bit per "
    "unit (element, sample or channel), native_dropout 1 byte per element (bool), PyTorch's "
    "eager CPU dropout its noise tensor in the input dtype. Temporaries are not counted; "
    "fwd+bwd adds the two phases. % copy = GB/s over y.copy_(x) of the same size and dtype, "
    "timed in the same run."
)


@dataclass
class Check:
    """``ran``: the implementation ran and was checked; ``error``: why not, or
    how it failed."""

    ran: bool = True
    passed: bool = True
    error: Optional[str] = None


@dataclass
class Row:
    op: str
    phase: str
    implementation: str
    variant: str
    kind: str
    dtype: str
    size: int
    shape: List[int]
    check: Check = field(default_factory=Check)
    time_ms: Optional[float] = None
    q25_ms: Optional[float] = None
    q75_ms: Optional[float] = None
    runs: Optional[int] = None
    round_ms: Optional[List[float]] = None  # the median of each interleaved round (runner.py)
    bytes: Optional[int] = None
    saved_bytes_per_element: Optional[float] = None
    gbps: Optional[float] = None
    pct_copy: Optional[float] = None
    vs_eager: Optional[float] = None
    vs_fastest_native: Optional[float] = None

    @property
    def timed(self) -> bool:
        return self.time_ms is not None

    @property
    def failed(self) -> bool:
        """A wrong result, or one of ours that could not run. A native route
        that cannot run here (torch.compile without a C++ compiler, say) is
        only noted."""
        return not self.check.passed and (self.check.ran or self.kind == "ours")


def derive(rows: List[Row]) -> None:
    """Fill GB/s, % of copy bandwidth and the speedups, from rows of one run."""
    for row in rows:
        if row.timed:
            row.gbps = row.bytes / (row.time_ms * 1e-3) / 1e9
    copy_gbps = {(r.size, r.dtype): r.gbps for r in rows if r.variant == "copy" and r.timed}
    cells: Dict[tuple, List[Row]] = {}
    for row in rows:
        if row.timed and row.kind != "copy":
            cells.setdefault((row.op, row.phase, row.size, row.dtype), []).append(row)
    for (_, _, size, dtype), cell in cells.items():
        eager = [r.time_ms for r in cell if r.kind == "eager"]
        native = [r.time_ms for r in cell if r.kind in ("eager", "native")]
        for row in cell:
            if (size, dtype) in copy_gbps:
                row.pct_copy = 100.0 * row.gbps / copy_gbps[size, dtype]
            if eager:
                row.vs_eager = eager[0] / row.time_ms
            if native:
                row.vs_fastest_native = min(native) / row.time_ms


def write_json(path: str, run: dict) -> None:
    with open(path, "w") as out:
        json.dump(run, out, indent=1, default=asdict)
        out.write("\n")


def read_json(path: str) -> dict:
    with open(path) as src:
        run = json.load(src)
    run["rows"] = [Row(**{**r, "check": Check(**r["check"])}) for r in run["rows"]]
    return run


def write_csv(path: str, rows: List[Row]) -> None:
    names = [f.name for f in fields(Row) if f.name != "check"]
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(names + ["check_ran", "check_passed", "check_error"])
        for row in rows:
            values = [getattr(row, name) for name in names]
            writer.writerow(values + [row.check.ran, row.check.passed, row.check.error])
