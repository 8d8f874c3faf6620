"""The module layer: thin modules that store arguments and call functional.

The dropout modules subclass their torch counterparts, so constructor
arguments, ``extra_repr``, ``state_dict`` and ``isinstance`` checks stay those
of torch; ``DropPath`` takes timm's arguments and prints like timm's.
"""

import torch
from torch import Tensor

from . import functional as F

__all__ = [
    "BiasDropoutAdd",
    "DropPath",
    "DropPathAdd",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutAdd",
]


class _ChecksProbability:
    """Checks ``p`` first: torch's own constructor compares it unchecked ('0.1' < 0 raises, unnamed)."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        F._check_probability(p)
        super().__init__(p, inplace)


class Dropout(_ChecksProbability, torch.nn.Dropout):
    """Drop-in for :class:`torch.nn.Dropout`, fused and with a 1-bit mask.

    Args:
        p: probability of an element to be zeroed. Default: 0.5
        inplace: overwrite the input instead of allocating an output. Default: ``False``
        low_memory: save no mask for backward, only the Philox (seed, offset);
            backward draws the mask again. Default: ``False``
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, low_memory: bool = False) -> None:
        super().__init__(p, inplace)
        if inplace and low_memory:
            raise ValueError("Dropout: inplace and low_memory cannot be combined")
        self.low_memory = low_memory

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace, low_memory=self.low_memory)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", low_memory=True" if self.low_memory else "")


class Dropout1d(_ChecksProbability, torch.nn.Dropout1d):
    """Drop-in for :class:`torch.nn.Dropout1d`; saves one bit per (n, c)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(_ChecksProbability, torch.nn.Dropout2d):
    """Drop-in for :class:`torch.nn.Dropout2d`; saves one bit per (n, c)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(_ChecksProbability, torch.nn.Dropout3d):
    """Drop-in for :class:`torch.nn.Dropout3d`; saves one bit per (n, c)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace)


class DropPath(torch.nn.Module):
    """Drop paths (stochastic depth) per sample; drop-in for ``timm.layers.DropPath``.

    Args:
        drop_prob: probability of a sample's path to be dropped. Default: 0.0
        scale_by_keep: scale kept samples by 1 / q, q the keep probability
            (1 - drop_prob, quantized to 2^-16 steps). Default: ``True``
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        F._check_probability(drop_prob, "drop_path probability")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return F.drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class DropoutAdd(torch.nn.Module):
    """``residual + dropout(input)`` in one pass: ``forward(input, residual)``.

    Args:
        p: probability of an element of ``input`` to be zeroed. Default: 0.5
        low_memory: save no mask, only the Philox (seed, offset). Default: ``False``
    """

    def __init__(self, p: float = 0.5, low_memory: bool = False) -> None:
        super().__init__()
        F._check_probability(p)
        self.p = p
        self.low_memory = low_memory

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return F.dropout_add(input, residual, self.p, self.training, low_memory=self.low_memory)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", low_memory=True" if self.low_memory else "")


class BiasDropoutAdd(torch.nn.Module):
    """``residual + dropout(input + bias)`` in one pass: ``forward(input, bias, residual)``,
    as after a linear layer whose bias add is deferred (Megatron's skip_bias_add).

    Args:
        p: probability of an element to be zeroed. Default: 0.5
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        F._check_probability(p)
        self.p = p

    def forward(self, input: Tensor, bias: Tensor, residual: Tensor) -> Tensor:
        return F.bias_dropout_add(input, bias, residual, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropPathAdd(DropPath):
    """``residual + drop_path(input)`` in one pass: ``forward(input, residual)``.
    Arguments as :class:`DropPath`."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return F.drop_path_add(input, residual, self.drop_prob, self.training, self.scale_by_keep)
