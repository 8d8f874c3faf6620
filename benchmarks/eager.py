"""The PyTorch expressions the fused ops replace, as users write them today.

Each takes the operands of its regdrop op in the op's order, then ``p``. The
drop-path pair follows timm (``timm.layers.drop_path``), which is not required.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dropout(input: Tensor, p: float) -> Tensor:
    return F.dropout(input, p)


def dropout_add(input: Tensor, residual: Tensor, p: float) -> Tensor:
    return residual + F.dropout(input, p)


def bias_dropout_add(input: Tensor, bias: Tensor, residual: Tensor, p: float) -> Tensor:
    return residual + F.dropout(input + bias, p)


def drop_path(input: Tensor, p: float) -> Tensor:
    """timm's formula: one Bernoulli draw per sample along dim 0, scaled by keep."""
    keep = 1.0 - p
    per_sample = (input.shape[0],) + (1,) * (input.ndim - 1)
    return input * input.new_empty(per_sample).bernoulli_(keep).div_(keep)


def drop_path_add(input: Tensor, residual: Tensor, p: float) -> Tensor:
    return residual + drop_path(input, p)


def channel_dropout(input: Tensor, p: float) -> Tensor:
    return F.dropout2d(input, p)


class DropPath(nn.Module):
    """timm's DropPath module: ``drop_path`` while training, identity otherwise."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        return drop_path(x, self.drop_prob)


def native_dropout(input: Tensor, p: float):
    """``aten.native_dropout``, the kernel behind F.dropout on CUDA: (output, mask)."""
    return torch.ops.aten.native_dropout(input, p, True)


def native_dropout_backward(grad: Tensor, mask: Tensor, p: float) -> Tensor:
    return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))
