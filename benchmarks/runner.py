"""The benchmark grid: size x dtype x op x implementation x phase.

For every implementation at every size and dtype: call it once forward and
backward, recording what the forward saves for backward (for torch.compile
this first call compiles, and its wall time is reported as the compile
time); check the results (checks.py); and only then time the three phases. An
implementation that fails its check, or cannot run, gets rows with the
reason and no time.

A cell's implementations, and the two references, are timed interleaved
(timing.py): a row's time is the median of its fastest round, its quartiles
those of its runs of all rounds.
"""

import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from .checks import check, unit_count
from .op_table import Op, make_operands, positive, positive_like, shape_for
from .results import PHASES, VARIANTS, Check, Row, derive
from .saved import total_bytes
from .timing import interleaved, synchronize

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Settings:
    device: torch.device
    sizes: Sequence[int]
    dtypes: Sequence[torch.dtype]
    threads: int
    p: float
    budget_s: float  # per row, spread over the rounds
    rounds: int = 1


def grid(ops: Sequence[Op], variants: Sequence[str]) -> Tuple[List[Tuple[Op, list]], List[str]]:
    """The ops and implementations that can run here, and a note for each that cannot."""
    runnable, notes = [], []
    for op in ops:
        if op.missing():
            notes.append(f"{op.key}: skipped, {op.missing()}")
            continue
        impls = []
        for impl in op.implementations():
            if impl.variant not in variants:
                continue
            if impl.missing():
                notes.append(f"{op.key}: {impl.label} skipped, {impl.missing()}")
            else:
                impls.append(impl)
        runnable.append((op, impls))
    return runnable, notes


def run(settings: Settings, runnable, progress):
    """Rows for every cell of the grid, and the torch.compile times.
    ``progress`` is a tqdm bar, advanced once per implementation."""
    rows, compiles = [], []
    for size in settings.sizes:
        for dtype in settings.dtypes:
            rows += _copy_rows(settings, size, dtype)
            for op, impls in runnable:
                if not op.runs_for(dtype):
                    continue
                shape = shape_for(size, op.unit)
                operands = make_operands(op.operands, shape, dtype, settings.device, op.operand_dtypes())
                out_dtype = dtype
                for t in operands.values():  # the output's dtype: eager's, for mixed operands
                    out_dtype = torch.promote_types(out_dtype, t.dtype)
                grad = positive(operands["input"].shape, out_dtype, settings.device)
                timed = []
                progress.set_postfix_str(f"{op.key} {DTYPE_NAMES[dtype]} {size:,}")
                for impl in impls:
                    impl_rows, phases, first_call_s = _prepare(settings, op, impl, operands, grad)
                    rows += impl_rows
                    timed += zip(impl_rows, phases)
                    if impl.variant == "compile" and first_call_s is not None:
                        compiles.append(
                            {"op": op.key, "dtype": DTYPE_NAMES[dtype], "size": size, "seconds": first_call_s}
                        )
                _time_interleaved(settings, timed)
                progress.update(len(impls))
    derive(rows)
    return rows, compiles


def _copy_rows(settings: Settings, size: int, dtype: torch.dtype) -> List[Row]:
    """``y.copy_(x)`` into an existing tensor: the bandwidth roofline. And
    ``x.clone()``: the same bytes into a new tensor, as every out-of-place op
    writes; on CPU a fresh large allocation costs page faults."""
    x = positive(size, dtype, settings.device)
    y = torch.empty_like(x)
    rows, timed = [], []
    for label, variant, fn in (("y.copy_(x)", "copy", lambda: y.copy_(x)), ("x.clone()", "clone", x.clone)):
        row = Row("copy", "forward", label, variant, "copy", DTYPE_NAMES[dtype], size, [size])
        if torch.equal(fn(), x):
            timed.append((row, (fn, 2 * x.nbytes)))
        else:
            row.check = Check(passed=False, error=f"{label} differs from x")
        rows.append(row)
    _time_interleaved(settings, timed)
    return rows


def _prepare(settings: Settings, op: Op, impl, operands, grad):
    """The implementation's three rows, untimed; for each row what to time,
    ``(fn, bytes moved)``, unless it failed; and the wall time of its first call."""
    x = operands["input"]
    base = dict(
        op=op.key,
        implementation=impl.label,
        variant=impl.variant,
        kind=VARIANTS[impl.variant],
        dtype=DTYPE_NAMES[x.dtype],
        size=x.numel(),
        shape=list(x.shape),
    )

    def untimed(check: Check):
        return [Row(**base, phase=phase, check=check) for phase in PHASES], [], None

    try:
        call = impl.bind(operands, settings.p)
        start = time.perf_counter()
        (output, mask), saved = call.saved_forward()
        grads = call.backward(output, mask, grad, retain=True)
        synchronize(settings.device)
        first_call_s = time.perf_counter() - start
    except Exception as error:  # cannot run here: noted, and a failure if it is ours
        return untimed(Check(ran=False, passed=False, error=_first_line(error)))
    try:
        with torch.no_grad():
            unit_keep = call.unit_keep(output, mask, unit_count(x.shape, op.unit))
            check(operands, output, unit_keep, grad, grads, settings.p, quantized=base["kind"] == "ours")
    except Exception as error:  # CheckFailed, or results too malformed to compare
        return untimed(Check(passed=False, error=_first_line(error)))

    forward_bytes = total_bytes([*operands.values(), output, *saved])
    backward_bytes = total_bytes([grad, *saved, *grads.values()])
    phases = {
        "forward": (call.forward, forward_bytes),
        "backward": (lambda: call.backward(output, mask, grad, retain=True), backward_bytes),
        "fwd+bwd": (
            lambda: call.backward(*call.forward(), grad, retain=False),
            forward_bytes + backward_bytes,
        ),
    }
    saved_per_element = total_bytes(saved) / x.numel()
    rows = [Row(**base, phase=phase, saved_bytes_per_element=saved_per_element) for phase in phases]
    return rows, list(phases.values()), first_call_s


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _time_interleaved(settings: Settings, timed) -> None:
    """Time each ``(row, (fn, bytes moved))``, interleaved."""
    fns = [fn for _, (fn, _) in timed]
    for (row, (_, moved)), t in zip(timed, interleaved(fns, settings.device, settings.threads, settings.budget_s,
                                                        settings.rounds)):
        row.time_ms, row.q25_ms, row.q75_ms, row.runs = t.time_ms, t.pooled.q25_ms, t.pooled.q75_ms, t.pooled.runs
        row.round_ms, row.bytes = t.round_ms, moved
