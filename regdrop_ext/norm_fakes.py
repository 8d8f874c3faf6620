"""Fake kernels of the norm ops (csrc/norm/norm_schemas.h), for
torch.compile, meta tensors and symbolic shapes: the outputs of
csrc/norm/norm_ops.h, with its checks in its order (the element family's
check helpers, regdrop_ext._ops). Provisional, until the op manifest
generates them.
"""

import torch

from ._ops import _check_floating, _check_forward, _check_mask, _check_matches, _check_probability, _check_rng_state
from ._ops import _check_shard

_HALF = (torch.float16, torch.bfloat16)


def _compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_companion(t, name, dtype):
    if not (t.dtype == dtype or (t.dtype == torch.float32 and dtype in _HALF)):
        raise TypeError(f"{name} must have input's dtype ({dtype}), or float32 with a float16 or bfloat16 input, "
                        f"got {t.dtype}")


def _check_rows(t, name, drop_path):
    if t.dim() < 1:
        raise RuntimeError(f"{name} must have at least 1 dimension (the normalized one), got a 0-d tensor")
    torch._check(t.shape[-1] > 0, lambda: f"{name}'s last dimension (the normalized one) must not be empty")
    if drop_path and t.dim() < 2:
        raise RuntimeError(f"{name} must have a sample dimension (dim 0) besides the normalized one for drop-path")


def _check_parameter(t, name, like):
    if t is None:
        return
    _check_floating(t, name)
    if t.device != like.device:
        raise RuntimeError(f"{name} must be on the same device as input ({like.device}), got {t.device}")
    torch._check(t.dim() == 1 and t.shape[0] == like.shape[-1],
                 lambda: f"{name} must be 1-D with the size of input's last dimension ({like.shape[-1]})")
    _check_companion(t, name, like.dtype)


def _units(input, p, drop_path):
    if p == 0:
        return 0
    return input.shape[0] if drop_path else input.numel()


def _forward(input, residual, weight, bias, p, rms, input_bias, drop_path, residual_in_fp32, generator, seed, offset,
             shard, low_memory):
    _check_forward(input, p, generator, seed, offset)
    _check_rows(input, "input", drop_path)
    if residual is not None:
        _check_matches(residual, "residual", input, "input")
        _check_companion(residual, "residual", input.dtype)
    for t, name in ((weight, "weight"), (bias, "bias"), (input_bias, "input_bias")):
        _check_parameter(t, name, input)
    units = _units(input, p, drop_path)
    _check_shard(shard, units)
    stream = residual.dtype if residual is not None else (
        torch.float32 if residual_in_fp32 and input.dtype in _HALF else input.dtype)
    output = input.new_empty(input.shape)
    residual_out = input.new_empty(input.shape, dtype=stream)
    if low_memory:
        mask = input.new_empty((2,), dtype=torch.int64)
    else:
        mask = input.new_empty(((units + 7) // 8,), dtype=torch.uint8)
    stats = input.shape[:-1]
    return (output, residual_out, mask, input.new_empty(stats, dtype=_compute(input.dtype)),
            input.new_empty(stats, dtype=_compute(input.dtype)))


@torch.library.register_fake("regdrop::dropout_add_norm")
def _(input, residual, weight, bias, p, eps=1e-5, rms=False, input_bias=None, drop_path=False, scale_by_keep=True,
      residual_in_fp32=False, generator=None, *, seed=None, offset=0, shard=None):
    return _forward(input, residual, weight, bias, p, rms, input_bias, drop_path, residual_in_fp32, generator, seed,
                    offset, shard, False)


@torch.library.register_fake("regdrop::dropout_add_norm_low_memory")
def _(input, residual, weight, bias, p, eps=1e-5, rms=False, input_bias=None, residual_in_fp32=False, generator=None,
      *, seed=None, offset=0, shard=None):
    return _forward(input, residual, weight, bias, p, rms, input_bias, False, residual_in_fp32, generator, seed,
                    offset, shard, True)


def _backward(grad_output, grad_residual_out, residual_out, mask, mean, rstd, weight, p, drop_path, residual_grad,
              wanted, low_memory, shard):
    _check_probability(p)
    _check_floating(grad_output, "grad_output")
    _check_rows(grad_output, "grad_output", drop_path)
    _check_matches(residual_out, "residual_out", grad_output, "grad_output")
    _check_companion(residual_out, "residual_out", grad_output.dtype)
    if grad_residual_out is not None:
        _check_matches(grad_residual_out, "grad_residual_out", grad_output, "grad_output")
    _check_parameter(weight, "weight", grad_output)
    for t, name in ((mean, "mean"), (rstd, "rstd")):
        torch._check(t.dtype == _compute(grad_output.dtype) and t.numel() * grad_output.shape[-1] == grad_output.numel(),
                     lambda: f"{name} must be the row statistics forward returned")
    for dtype, name in zip(wanted, ("weight_grad", "bias_grad", "input_bias_grad")):
        if dtype is not None and not (dtype == grad_output.dtype or (dtype == torch.float32 and grad_output.dtype in _HALF)):
            raise TypeError(f"{name} must be grad_output's dtype ({grad_output.dtype}), or float32 with a float16 or "
                            f"bfloat16 grad_output, got {dtype}")
    units = _units(grad_output, p, drop_path)
    if low_memory:
        _check_rng_state(mask, grad_output)
        _check_shard(shard, units)
    elif p > 0:
        _check_mask(mask, units, grad_output)
    hidden = grad_output.shape[-1]
    grads = [grad_output.new_empty(grad_output.shape),
             grad_output.new_empty(grad_output.shape, dtype=residual_out.dtype) if residual_grad else None]
    grads += [None if dtype is None else grad_output.new_empty((hidden,), dtype=dtype) for dtype in wanted]
    return tuple(grads)


@torch.library.register_fake("regdrop::dropout_add_norm_backward")
def _(grad_output, grad_residual_out, residual_out, mask, mean, rstd, weight, p, rms=False, drop_path=False,
      scale_by_keep=True, *, residual_grad=True, weight_grad=None, bias_grad=None, input_bias_grad=None):
    return _backward(grad_output, grad_residual_out, residual_out, mask, mean, rstd, weight, p, drop_path,
                     residual_grad, (weight_grad, bias_grad, input_bias_grad), False, None)


@torch.library.register_fake("regdrop::dropout_add_norm_low_memory_backward")
def _(grad_output, grad_residual_out, residual_out, rng_state, mean, rstd, weight, p, rms=False, *,
      residual_grad=True, weight_grad=None, bias_grad=None, input_bias_grad=None, shard=None):
    return _backward(grad_output, grad_residual_out, residual_out, rng_state, mean, rstd, weight, p, False,
                     residual_grad, (weight_grad, bias_grad, input_bias_grad), True, shard)
