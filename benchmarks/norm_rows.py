"""The norm family's rows: residual + dropout(x), then LayerNorm or RMSNorm
over the last dimension, on (rows, hidden) tensors, timed side by side in one
run against

- eager: ``F.layer_norm(r + F.dropout(x, p), ...)`` (``F.rms_norm``), through autograd;
- compile: ``torch.compile`` of that expression (a fresh compile per cell);
- ours: ``regdrop_ext.dropout_add_layer_norm`` (``dropout_add_rms_norm``), through autograd;

for the forward and forward+backward phases, with the bytes each saves for
backward per element (measured through saved_tensors_hooks). A cell's
implementations and phases are timed interleaved (timing.py).

    python benchmarks/bench.py --norm [--json PATH]          # with the op rows
    python -m benchmarks.norm_rows [--rows 8192 --hidden 1024 --dtypes fp32,bf16 --json PATH]

Every implementation is checked before it is timed: at p = 0 its output's
and gradients' errors against F.layer_norm(x + r) (F.rms_norm) in float32
are at most twice eager PyTorch's own plus the dtype's tolerance; and the
fused op's keep rate at p (where its residual stream differs from r) is
within 5 sigma of 1 - p.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List

if __package__ in (None, ""):
    sys.path.pop(0)
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import regdrop_ext  # noqa: E402
from benchmarks import environment, timing  # noqa: E402
from benchmarks.report import norm_markdown  # noqa: E402
from benchmarks.saved import saved_for_backward  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PHASES = ("forward", "fwd+bwd")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def eager_expression(norm: str) -> Callable:
    if norm == "rms":
        return lambda x, r, w, b, p: F.rms_norm(r + F.dropout(x, p), (x.shape[-1],), w)
    return lambda x, r, w, b, p: F.layer_norm(r + F.dropout(x, p), (x.shape[-1],), w, b)


def fused(norm: str) -> Callable:
    if norm == "rms":
        return lambda x, r, w, b, p: regdrop_ext.dropout_add_rms_norm(x, r, w, p)
    return lambda x, r, w, b, p: regdrop_ext.dropout_add_layer_norm(x, r, w, b, p)


def implementations(norm: str) -> Dict[str, Callable]:
    expression = eager_expression(norm)
    label = "F.rms_norm(r + F.dropout(x))" if norm == "rms" else "F.layer_norm(r + F.dropout(x))"
    torch.compiler.reset()
    return {
        label: expression,
        f"torch.compile({label})": torch.compile(expression, dynamic=False),
        "regdrop_ext." + ("dropout_add_rms_norm" if norm == "rms" else "dropout_add_layer_norm"): fused(norm),
    }


def errors(fn: Callable, norm: str, leaves: List[torch.Tensor], grad: torch.Tensor) -> List[float]:
    """fn's largest errors at p = 0 against the float32 reference, relative
    to the reference's largest value: output, then the gradients of x, r, w
    and b (b: 0 for RMSNorm)."""
    reference = eager_expression(norm)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    expected = reference(*ref_leaves, 0.0)
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad.float(), allow_unused=True)
    actual = fn(*leaves, 0.0)
    grads = torch.autograd.grad(actual, leaves, grad, allow_unused=True)
    def relative(a, e):  # the largest error, relative to the largest value
        return (a.float() - e).abs().max().item() / max(e.abs().max().item(), 1e-30)

    return [relative(actual, expected)] + [0.0 if e is None else relative(a, e) for a, e in zip(grads, expected_grads)]


def check(fn: Callable, norm: str, leaves: List[torch.Tensor], grad: torch.Tensor, baseline: List[float]) -> None:
    """Raises where fn's errors at p = 0 exceed twice eager PyTorch's own
    (baseline) plus the dtype's tolerance: tolerances relative to PyTorch's
    error, as FlashAttention's tests bound theirs (eager's bfloat16
    LayerNorm weight and bias gradients are off by about 10% at 8192 rows
    on the CPU)."""
    tolerance = TOLERANCE[leaves[0].dtype]
    for name, error, allowed in zip(["output", "grad x", "grad r", "grad w", "grad b"],
                                    errors(fn, norm, leaves, grad), baseline):
        if error > 2 * allowed + tolerance:
            raise AssertionError(f"{name}: error {error:.3g}, eager's {allowed:.3g}")


def keep_rate(norm: str, x, r, w, b, p: float) -> float:
    """The fused op's keep rate: where residual_out differs from r."""
    _, residual_out, *_ = torch.ops.regdrop.dropout_add_norm(x, r, w, None if norm == "rms" else b, p, 1e-5,
                                                             norm == "rms")
    return (residual_out != r).double().mean().item()


def run(rows: int, hidden: int, dtypes, norms, p: float, threads: int, budget_s: float,
        rounds: int) -> List[dict]:
    device = torch.device("cpu")
    results = []
    for dtype in dtypes:
        for norm in norms:
            g = torch.Generator().manual_seed(0)
            x = (torch.rand(rows, hidden, generator=g) + 0.5).to(dtype)
            r = torch.randn(rows, hidden, generator=g).to(dtype)
            w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
            b = torch.randn(hidden, generator=g).to(dtype)
            grad = torch.randn(rows, hidden, generator=g).to(dtype)
            rate = keep_rate(norm, x, r, w, b, p)
            sigma = math.sqrt(p * (1 - p) / x.numel())
            if abs(rate - (1 - p)) > 5 * sigma:
                raise SystemExit(f"keep rate {rate} is not within 5 sigma of {1 - p}")
            impls = implementations(norm)
            baseline = errors(next(iter(impls.values())), norm, [t.clone().requires_grad_() for t in (x, r, w, b)],
                              grad)
            cell = []  # (row without its times, what to time), for every implementation and phase
            for label, fn in impls.items():
                leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
                check(fn, norm, leaves, grad, baseline)
                _, saved = saved_for_backward(lambda: fn(*leaves, p))
                # What the call adds: the operands (and parameters) are held anyway.
                held = {t.data_ptr() for t in leaves}
                saved_bytes = sum(t.nbytes for t in saved if t.data_ptr() not in held)

                def forward(fn=fn, leaves=leaves):
                    return fn(*leaves, p)

                def forward_backward(fn=fn, leaves=leaves):
                    torch.autograd.grad(fn(*leaves, p), leaves, grad, allow_unused=True)

                for phase, call in zip(PHASES, (forward, forward_backward)):
                    cell.append(({"norm": norm, "dtype": {v: k for k, v in DTYPES.items()}[dtype], "rows": rows,
                                  "hidden": hidden, "implementation": label, "phase": phase,
                                  "saved_bytes_per_element": saved_bytes / x.numel()}, call))
            timed = timing.interleaved([call for _, call in cell], device, threads, budget_s, rounds)
            for (row, _), t in zip(cell, timed):
                results.append({**row, "median_ms": t.time_ms, "q25_ms": t.pooled.q25_ms, "q75_ms": t.pooled.q75_ms,
                                "runs": t.pooled.runs, "round_ms": t.round_ms})
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--norms", default="layer,rms")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per row, over the rounds")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (timing.py)")
    parser.add_argument("--json", metavar="PATH")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    env = environment.describe(torch.device("cpu"), threads)
    print(environment.header(env))
    print(f"timing:   {timing.describe(torch.device('cpu'), threads, args.budget / args.rounds)}, "
          f"{args.rounds} interleaved rounds; the median of the fastest round")
    results = run(args.rows, args.hidden, [DTYPES[d] for d in args.dtypes.split(",")], args.norms.split(","),
                  args.p, threads, args.budget, args.rounds)
    print(norm_markdown(results))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"environment": env, "p": args.p, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    environment.pin_allocator()
    sys.exit(main())
