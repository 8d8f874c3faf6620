"""Scaled dot-product attention whose dropout regdrop_ext draws.

``F.scaled_dot_product_attention(..., dropout_p=p)`` draws its dropout inside
the attention kernel. A fused kernel (flash, memory-efficient, cuDNN) must
stay fused, so its dropout stays its own. Where SDPA runs its math path
anyway (always on the CPU once ``dropout_p > 0``: its CPU flash kernel takes
no dropout), the same math with regdrop_ext's dropout on the attention
weights costs nothing more: ``softmax(Q K^T * scale + mask)``, then
``regdrop_ext.dropout``, then ``@ V``, as torch's math path computes it.
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

from . import functional

__all__ = ["math_path_runs", "scaled_dot_product_attention"]


def math_path_runs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> bool:
    """Whether ``F.scaled_dot_product_attention`` would run its math path on
    these arguments. On the CPU, every call with ``dropout_p > 0`` does: its
    flash kernel takes no dropout. On a GPU, a call that no enabled fused
    kernel (flash, memory-efficient, cuDNN) takes; SDPA's own checks decide
    (``torch.backends.cuda.can_use_*``, which ``torch.compile`` can trace)."""
    if query.device.type == "cpu":
        return dropout_p > 0.0 or torch._fused_sdp_choice(query, key, value, attn_mask, 0.0, is_causal) == int(
            SDPBackend.MATH
        )
    params = torch.backends.cuda.SDPAParams(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    return not (
        torch.backends.cuda.can_use_flash_attention(params)
        or torch.backends.cuda.can_use_efficient_attention(params)
        or torch.backends.cuda.can_use_cudnn_attention(params)
    )


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` computed as torch's math path does,
    with the dropout of the attention weights drawn by ``regdrop_ext.dropout``.

    Same arguments and result as torch's (within float rounding of the math
    path: q and k are each scaled by sqrt(scale), 16-bit inputs are computed
    in float32 unless ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``,
    fully masked rows give zeros). Always the math path: on a GPU this gives
    up the fused kernels.
    """
    if attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_attention: an explicit attn_mask cannot be combined with is_causal=True")
    dtype = query.dtype
    upcast = dtype in (torch.float16, torch.bfloat16) and not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    if enable_gqa:
        groups = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    root = math.sqrt(1.0 / math.sqrt(query.size(-1)) if scale is None else scale)
    weights = (query * root) @ (key * root).transpose(-2, -1)
    if is_causal:
        attn_mask = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            weights = weights.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            weights = weights + attn_mask
    weights = torch.ops.aten._safe_softmax(weights, -1)  # a fully masked row gives zeros, as SDPA's
    weights = functional.dropout(weights, dropout_p, True)
    return (weights @ value).to(dtype)
