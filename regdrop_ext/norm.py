"""Dropout, residual and LayerNorm / RMSNorm in one pass.

Each function computes, over the last dimension,

    residual_out = residual + dropout(input [+ input_bias])
    output = norm(residual_out) * weight [+ bias]

in one pass over the rows (``torch.ops.regdrop.dropout_add_norm``), where
unfused code runs dropout, the add and the norm apart. Element dropout draws
the mask ``dropout_add`` draws for the same seed and offset; the drop-path
forms drop whole samples (dim 0). Autograd saves the 1-bit mask, the per-row
mean and rstd, and ``residual_out``: with ``prenorm=True`` the function
returns ``(output, residual_out)`` (a pre-norm block's normalized input and
its new residual stream), which the caller holds anyway.

- ``residual_in_fp32``: without a residual, keep the residual stream in
  float32 for a 16-bit input (as FlashAttention's ``layer_norm_fn``). With a
  residual, the stream has the residual's dtype (input's, or float32).
- ``training=False`` or ``p == 0``: no dropout and no mask.
- ``low_memory=True`` (element dropout): autograd saves the 16-byte
  ``rng_state`` instead of the mask, and backward draws the bits again.
- ``generator``: as every regdrop op (the device's default generator if None).

The output has input's dtype. Statistics and gradients are added in an order
fixed by the shape alone (the CPU and CUDA kernels give the same bits).
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

Output = Union[Tensor, Tuple[Tensor, Tensor]]


__all__ = ["drop_path_add_layer_norm", "drop_path_add_rms_norm", "dropout_add_layer_norm", "dropout_add_rms_norm"]


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:  # NaN too
        raise ValueError(f"p must be a probability in [0, 1], got {p}")


def _dropout_add_norm(
    input: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    p: float,
    eps: Optional[float],
    rms: bool,
    training: bool,
    input_bias: Optional[Tensor],
    drop_path: bool,
    scale_by_keep: bool,
    prenorm: bool,
    residual_in_fp32: bool,
    low_memory: bool,
    generator: Optional[torch.Generator],
) -> Output:
    _check_p(p)
    if not training:
        p = 0.0
    if eps is None:  # F.rms_norm's default
        eps = torch.finfo(input.dtype).eps
    ops = torch.ops.regdrop
    if low_memory and p > 0 and not drop_path:
        output, residual_out, _, _, _ = ops.dropout_add_norm_low_memory(
            input, residual, weight, bias, p, eps, rms, input_bias, residual_in_fp32, generator
        )
    else:
        output, residual_out, _, _, _ = ops.dropout_add_norm(
            input, residual, weight, bias, p, eps, rms, input_bias, drop_path, scale_by_keep, residual_in_fp32,
            generator,
        )
    return (output, residual_out) if prenorm else output


def dropout_add_layer_norm(
    input: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    p: float = 0.5,
    eps: float = 1e-5,
    *,
    training: bool = True,
    input_bias: Optional[Tensor] = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    low_memory: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Output:
    """``F.layer_norm(residual + F.dropout(input + input_bias, p), (H,), weight, bias, eps)`` in one pass.

    Args:
        input: ``(..., H)``, the branch (a sublayer's output).
        residual: ``input``'s shape, or None.
        weight, bias: ``(H,)`` or None (LayerNorm without affine or without bias).
        p: element dropout probability.
        input_bias: ``(H,)`` added before the dropout (a linear layer's bias), or None.
        prenorm: also return the new residual stream.

    Returns:
        the normalized output, or ``(output, residual_out)`` with ``prenorm=True``.
    """
    return _dropout_add_norm(input, residual, weight, bias, p, eps, False, training, input_bias, False, True,
                             prenorm, residual_in_fp32, low_memory, generator)


def dropout_add_rms_norm(
    input: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    p: float = 0.5,
    eps: Optional[float] = None,
    *,
    training: bool = True,
    input_bias: Optional[Tensor] = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    low_memory: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Output:
    """``F.rms_norm(residual + F.dropout(input + input_bias, p), (H,), weight, eps)`` in one pass.

    ``eps=None`` is ``torch.finfo(input.dtype).eps``, as for ``F.rms_norm``. See
    ``dropout_add_layer_norm`` for the other arguments.
    """
    return _dropout_add_norm(input, residual, weight, None, p, eps, True, training, input_bias, False, True,
                             prenorm, residual_in_fp32, low_memory, generator)


def drop_path_add_layer_norm(
    input: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    p: float = 0.0,
    eps: float = 1e-5,
    *,
    training: bool = True,
    scale_by_keep: bool = True,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Output:
    """``F.layer_norm(residual + drop_path(input, p), ...)`` in one pass: whole samples (dim 0)
    of ``input`` are dropped, as timm's ``drop_path`` drops them. See ``dropout_add_layer_norm``."""
    return _dropout_add_norm(input, residual, weight, bias, p, eps, False, training, None, True, scale_by_keep,
                             prenorm, residual_in_fp32, False, generator)


def drop_path_add_rms_norm(
    input: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    p: float = 0.0,
    eps: Optional[float] = None,
    *,
    training: bool = True,
    scale_by_keep: bool = True,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Output:
    """``F.rms_norm(residual + drop_path(input, p), ...)`` in one pass. See ``drop_path_add_layer_norm``."""
    return _dropout_add_norm(input, residual, weight, None, p, eps, True, training, None, True, scale_by_keep,
                             prenorm, residual_in_fp32, False, generator)
