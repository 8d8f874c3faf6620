"""The run time of a callable: median and interquartile range, in milliseconds.

- CUDA: ``triton.testing.do_bench`` where triton is importable (CUDA events,
  L2 cache flushed before every run); otherwise the same method here.
- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` at a fixed thread count.

``budget_s`` is the least time spent measuring one callable (warm-up aside).

Callables compared with one another are timed ``interleaved``: in rounds,
each callable in turn, then again. A shared 2-core machine changes state for
a second or more at a time: the same call through autograd at 64K elements
takes 24 us in some rounds and 45 us in others, whoever's it is. Timed one
after another, or judged by all rounds pooled, callables would be compared
across those states; each one's fastest round compares them in the same one.
"""

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch
from torch.utils.benchmark import Timer

# Larger than the L2 cache of any GPU: zeroing it evicts the previous run's data.
_FLUSH_BYTES = 256 << 20
_WARMUP_MS = 25


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    runs: int

    @classmethod
    def of(cls, times_ms: List[float]) -> "Timing":
        quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        q25, median, q75 = torch.quantile(torch.tensor(times_ms, dtype=torch.float64), quartiles)
        return cls(median.item(), q25.item(), q75.item(), len(times_ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_times(fn: Callable[[], object], device: torch.device, threads: int, budget_s: float) -> List[float]:
    """The times of the runs of ``fn``, in milliseconds."""
    if device.type == "cuda":
        return _cuda_times(fn, budget_s)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return [t * 1e3 for t in timer.blocked_autorange(min_run_time=budget_s).times]


def measure(fn: Callable[[], object], device: torch.device, threads: int, budget_s: float) -> Timing:
    return Timing.of(run_times(fn, device, threads, budget_s))


@dataclass(frozen=True)
class Interleaved:
    time_ms: float  # the median of the fastest round
    pooled: Timing  # the runs of all rounds
    round_ms: List[float]  # each round's median


def interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, threads: int, budget_s: float, rounds: int
) -> List[Interleaved]:
    """Each of ``fns`` timed for ``budget_s`` in all, in ``rounds`` rounds that visit every one in turn."""
    runs: List[List[List[float]]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, of_fn in zip(fns, runs):
            of_fn.append(run_times(fn, device, threads, budget_s / rounds))
    results = []
    for of_fn in runs:
        medians = [Timing.of(r).median_ms for r in of_fn]
        results.append(Interleaved(min(medians), Timing.of([t for r in of_fn for t in r]), medians))
    return results


def _cuda_times(fn, budget_s: float) -> List[float]:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_event_times(fn, budget_s)
    return list(do_bench(fn, warmup=_WARMUP_MS, rep=budget_s * 1e3, return_mode="all"))


def _cuda_event_times(fn, budget_s: float) -> List[float]:
    """do_bench's method: estimate the run time, warm up, then time each run
    with CUDA events after flushing the L2 cache."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(_WARMUP_MS / estimate_ms))):
        fn()
    runs = max(1, int(budget_s * 1e3 / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for run_start, run_end in zip(starts, ends):
        flush.zero_()
        run_start.record()
        fn()
        run_end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def describe(device: torch.device, threads: int, budget_s: float) -> str:
    if device.type == "cuda":
        try:
            import triton.testing  # noqa: F401
        except ImportError:
            return f"CUDA events with the L2 cache flushed before each run, {budget_s * 1e3:g} ms per measurement"
        return f"triton.testing.do_bench(rep={budget_s * 1e3:g} ms, return_mode='all')"
    return f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={budget_s:g} s) on {threads} threads"
