"""The checks every implementation passes before it is timed.

Every op computes ``output = [residual +] (keep ? ([input + bias]) * scale : 0)``
with one keep flag per unit: an element, a sample along dim 0, or an (n, c)
channel, and ``scale`` the inverse of the keep probability: ``1 / (1 - p)``
for PyTorch, ``1 / (1 - round(65536 p) / 65536)`` for regdrop, whose p is
quantized to 2^-16 steps (keep_scale). Units are contiguous runs of
elements, since the benchmark's inputs are contiguous.

- The keep flags come from the implementation's own mask where it returns
  one; otherwise they are read off its output (inputs are positive, so a kept
  unit never yields 0, nor ``residual`` itself). The output and the gradients
  must then agree with a reference computed from those flags in float32
  (float64 for float64 inputs; bias-gradient sums accumulate in float64), and
  each unit's elements must share one flag.
- The tolerance is 4 machine epsilons of the working dtype, relative, with
  no absolute slack: dropped elements must be exact. An eager composition
  rounds up to four times (bias add, noise scale, product, residual add), the
  reference up to three, each time by at most half an epsilon. A sum over R
  rows (the bias gradient) may err by R float32 epsilons more: the classical
  bound for summing positive terms in any order.
- The number of kept units must lie within 5 sigma of its binomial mean,
  plus the 2^-17 by which regdrop's 16-bit threshold may move the keep rate.
"""

import math
from typing import Dict

import torch
from torch import Tensor

EPSILONS = 4
SIGMAS = 5.0


class CheckFailed(AssertionError):
    pass


def unit_count(shape, unit: str) -> int:
    if unit == "sample":
        return shape[0]
    if unit == "channel":
        return shape[0] * shape[1]
    return math.prod(shape)


def expand(unit_keep: Tensor, shape) -> Tensor:
    """Unit flags to element flags: each unit is a contiguous run of elements."""
    return unit_keep.view(-1, 1).expand(-1, math.prod(shape) // unit_keep.numel()).reshape(shape)


def keep_from_bits(mask: Tensor, units: int) -> Tensor:
    """regdrop's mask: bit i % 8 of byte i // 8 is the keep flag of unit i."""
    if mask.dtype != torch.uint8 or mask.numel() != (units + 7) // 8:
        raise CheckFailed(f"mask: {mask.numel()} x {mask.dtype}, expected ceil({units} / 8) x uint8")
    bit = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask.unsqueeze(-1) >> bit) & 1).view(-1)[:units].bool()


def keep_from_elements(element_keep: Tensor, units: int) -> Tensor:
    """One flag per unit, from its first element; the output check catches
    units whose elements disagree."""
    return element_keep.reshape(units, -1)[:, 0]


def element_keep_from_output(output: Tensor, operands: Dict[str, Tensor]) -> Tensor:
    dropped = operands.get("residual")
    return output != (0 if dropped is None else dropped)


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_scale(p: float, quantized: bool) -> float:
    """The kept units' scale: 1 / (1 - p), or, ``quantized`` (regdrop), the
    inverse of the keep probability its 16-bit threshold gives."""
    keep = 1.0 - math.floor(p * 65536.0 + 0.5) / 65536.0 if quantized else 1.0 - p
    return 1.0 / keep if keep > 0 else 0.0


def _dropped(values: Tensor, keep: Tensor, scale: float) -> Tensor:
    """keep ? values * scale : 0, in place: references of 16M+ elements
    are cheaper with fewer temporaries."""
    return values.mul_(scale).masked_fill_(keep.logical_not(), 0.0)


def expected_output(operands: Dict[str, Tensor], keep: Tensor, scale: float) -> Tensor:
    x = operands["input"]
    y = x.to(reference_dtype(x.dtype), copy=True)
    if "bias" in operands:
        y += operands["bias"]
    _dropped(y, keep, scale)
    if "residual" in operands:
        y += operands["residual"]
    return y


def expected_grads(operands: Dict[str, Tensor], grad: Tensor, keep: Tensor, scale: float):
    grad_input = _dropped(grad.to(reference_dtype(grad.dtype), copy=True), keep, scale)
    grads = {"input": grad_input}
    if "bias" in operands:
        grads["bias"] = grad_input.reshape(-1, grad_input.shape[-1]).sum(0, dtype=torch.float64)
    if "residual" in operands:
        grads["residual"] = grad
    return grads


def assert_matches(name: str, actual: Tensor, expected: Tensor, terms: int = 1, working=None) -> None:
    """``actual`` within EPSILONS epsilons of the working dtype (its own, or
    the inputs' where they are narrower: eager rounds to them in between) of
    ``expected``; ``terms`` > 1 for a sum of that many terms."""
    if actual.shape != expected.shape:
        raise CheckFailed(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    rtol = EPSILONS * max(torch.finfo(actual.dtype).eps, torch.finfo(working or actual.dtype).eps)
    if terms > 1:
        rtol += terms * torch.finfo(torch.float32).eps
    compute = torch.promote_types(expected.dtype, torch.float32)
    error = actual.to(compute, copy=True).sub_(expected).abs_()
    bad = error > expected.abs().to(compute).mul_(rtol)
    if bad.any():
        relative = (error[bad] / expected.abs()[bad]).max().item()
        raise CheckFailed(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off the reference "
            f"(max relative error {relative:.3g}, allowed {rtol:.3g})"
        )


def assert_keep_rate(unit_keep: Tensor, p: float) -> None:
    n, kept = unit_keep.numel(), int(torch.count_nonzero(unit_keep))
    q = 1.0 - p
    allowed = SIGMAS * math.sqrt(n * q * (1.0 - q)) + n * 2.0**-17
    if abs(kept - n * q) > allowed:
        raise CheckFailed(
            f"kept {kept} of {n} units, expected {n * q:.0f} +- {allowed:.0f} ({SIGMAS:g} sigma)"
        )


def check(operands, output, unit_keep, grad, grads, p: float, quantized: bool) -> None:
    """Raise CheckFailed unless ``output`` and ``grads`` are the op's, given
    ``unit_keep``; ``grads`` may hold a subset of the differentiable operands.
    ``quantized``: the implementation is regdrop's (see keep_scale)."""
    x = operands["input"]
    dtype = x.dtype
    for t in operands.values():  # eager's result dtype, for mixed operands
        dtype = torch.promote_types(dtype, t.dtype)
    if output.dtype != dtype:
        raise CheckFailed(f"output dtype {output.dtype}, expected {dtype}")
    keep = expand(unit_keep, x.shape)
    scale = keep_scale(p, quantized)
    assert_keep_rate(unit_keep, p)
    assert_matches("output", output, expected_output(operands, keep, scale), working=x.dtype)
    for name, expected in expected_grads(operands, grad, keep, scale).items():
        if name in grads:
            terms = x.numel() // x.shape[-1] if name == "bias" else 1
            assert_matches(f"grad of {name}", grads[name], expected, terms, working=x.dtype)
