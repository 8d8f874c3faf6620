"""The functional layer: drop-in replacements for torch.nn.functional and timm.

Each function takes the arguments of its torch (or timm) counterpart, then
``generator`` (and ``low_memory`` where there is one), and returns ``input``
itself when it would not change it (p == 0 or not training), as torch and
timm do. The fused residual forms return ``residual + input`` (one add) in
that case.

Every function compiles with ``torch.jit.script``, and so do the modules that
call them: hence no keyword-only arguments, which TorchScript refuses when
they have defaults. In-place calls are the raw in-place ops, whose autograd
is in C++ (csrc/autograd.cpp), so they need no autograd.Function either.
"""

import numbers
import warnings
from typing import Optional

import torch
from torch import Tensor


ops = torch.ops.regdrop

__all__ = [
    "bias_dropout_add",
    "drop_path",
    "drop_path_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add",
]


def _new_mask(units: int, like: Tensor) -> Tensor:
    """The mask an in-place op writes: a bit per unit, ceil(units / 8) bytes.
    From ``like``, so that under vmap it is a mask per sample."""
    return like.new_empty([(units + 7) // 8], dtype=torch.uint8)


@torch.jit.unused
def _is_real_number(p: float) -> bool:  # annotated for TorchScript, which never calls it
    return isinstance(p, numbers.Real)  # numpy's scalars too


def _check_probability(p: float, name: str = "dropout probability") -> None:
    if not torch.jit.is_scripting() and not _is_real_number(p):
        # Scripted, p is a float by its annotation; in Python, '0.1' would fail the comparison below, unnamed.
        raise TypeError(f"{name} must be a float, got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} has to be between 0 and 1, but got {p}")


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: Optional[torch.Generator] = None,
    low_memory: bool = False,
) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / q, q
    the keep probability (1 - p, quantized to 2^-16 steps), so that the
    expected output is the input.

    One pass over ``input``; autograd saves a 1-bit-per-element mask. Dropped
    elements are exactly 0 even where ``input`` is NaN or Inf.

    Args:
        input: a float32, float64, float16 or bfloat16 tensor.
        p: probability of an element to be zeroed. Default: 0.5
        training: apply dropout if ``True``. Default: ``True``
        inplace: overwrite ``input`` (no output allocation). Refused for inputs
            whose elements share memory (e.g. from ``expand()``). Default: ``False``
        generator: the ``torch.Generator`` to draw from; default: the device's.
        low_memory: save no mask, only the 16-byte Philox (seed, offset);
            backward draws the mask again. Default: ``False``
    """
    _check_probability(p)
    if inplace and low_memory:
        raise ValueError("dropout: inplace and low_memory cannot be combined")
    if not training or p == 0.0:
        return input
    if inplace:
        return ops.dropout_(input, _new_mask(input.numel(), input), p, generator)[0]
    if low_memory:
        return ops.dropout_low_memory(input, p, generator)[0]
    return ops.dropout(input, p, generator)[0]


def dropout_add(
    input: Tensor,
    residual: Tensor,
    p: float,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
    low_memory: bool = False,
) -> Tensor:
    """``residual + dropout(input, p)`` in one pass (forward and backward).

    ``input`` and ``residual`` must have the same shape, dtype and device (no
    broadcasting). The gradient of ``residual`` is the incoming gradient itself.
    """
    _check_probability(p)
    if not training or p == 0.0:
        return residual + input
    if low_memory:
        return ops.dropout_add_low_memory(input, residual, p, generator)[0]
    return ops.dropout_add(input, residual, p, generator)[0]


def bias_dropout_add(
    input: Tensor,
    bias: Tensor,
    residual: Tensor,
    p: float,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``residual + dropout(input + bias, p)`` in one pass, ``bias`` broadcast
    over the last dimension (Megatron's bias-dropout-add). Backward returns the
    bias gradient from the same pass."""
    _check_probability(p)
    if not training or p == 0.0:
        return residual + (input + bias)
    return ops.bias_dropout_add(input, bias, residual, p, generator)[0]


def drop_path(
    input: Tensor,
    p: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Drop whole samples (stochastic depth), as ``timm.layers.drop_path``:
    one Bernoulli draw per slice along dim 0; kept samples are scaled by
    1 / q, q the keep probability (1 - p, quantized to 2^-16 steps), when
    ``scale_by_keep``. Autograd saves one bit per sample."""
    _check_probability(p, "drop_path probability")
    if not training or p == 0.0:
        return input
    return ops.drop_path(input, p, scale_by_keep, generator)[0]


def drop_path_add(
    input: Tensor,
    residual: Tensor,
    p: float,
    training: bool = True,
    scale_by_keep: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``residual + drop_path(input, p)`` in one pass (forward and backward)."""
    _check_probability(p, "drop_path probability")
    if not training or p == 0.0:
        return residual + input
    return ops.drop_path_add(input, residual, p, scale_by_keep, generator)[0]


def _channel_dropout(
    input: Tensor, p: float, training: bool, inplace: bool, generator: Optional[torch.Generator], batched: bool
) -> Tensor:
    """Zero whole channels of an (N, C, *) tensor; ``batched=False`` adds N = 1.
    Its callers have checked ``p``."""
    if not training or p == 0.0:
        return input
    if inplace:  # as torch: an unbatched input gains and loses its batch dimension in place
        x = input if batched else input.unsqueeze_(0)
        out = ops.channel_dropout_(x, _new_mask(x.size(0) * x.size(1), x), p, generator)[0]
        return out if batched else out.squeeze_(0)
    x = input if batched else input.unsqueeze(0)
    out = ops.channel_dropout(x, p, generator)[0]
    return out if batched else out.squeeze(0)


def _warn_rank(name: str, dim: int, expected: str, meaning: str) -> None:
    warnings.warn(
        f"{name}: Received a {dim}-D input to {name}, which is deprecated and will result in an "
        f"error in a future release. To retain the behavior and silence this warning, please use "
        f"dropout instead. Note that {name} exists to provide channel-wise dropout on inputs with "
        f"{meaning}, a channel dimension, and an optional batch dimension (i.e. {expected} inputs).",
        stacklevel=3,
    )


def dropout1d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Drop-in for ``F.dropout1d``: (N, C, L) or unbatched (C, L) inputs;
    one bit per (n, c) is drawn and saved."""
    _check_probability(p)
    if input.dim() not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    return _channel_dropout(input, p, training, inplace, generator, batched=input.dim() == 3)


def dropout2d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Drop-in for ``F.dropout2d``, including its rules for other ranks: any
    input is read as (N, C, *), and a 3-D input as (N, C, L), as torch does."""
    _check_probability(p)
    if input.dim() not in (3, 4):
        _warn_rank("dropout2d", input.dim(), "3D or 4D", "2 spatial dimensions")
    if input.dim() == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return _channel_dropout(input, p, training, inplace, generator, batched=True)


def dropout3d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Drop-in for ``F.dropout3d``: (N, C, D, H, W) or unbatched (C, D, H, W)."""
    _check_probability(p)
    if input.dim() not in (4, 5):
        _warn_rank("dropout3d", input.dim(), "4D or 5D", "3 spatial dimensions")
    return _channel_dropout(input, p, training, inplace, generator, batched=input.dim() == 5)
