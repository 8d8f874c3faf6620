"""The functional layer: drop-in replacements for torch.nn.functional.

Each function takes the arguments of its torch (or timm) counterpart, plus a
keyword-only ``generator``, and returns ``input`` itself when it would not
change it (p == 0 or not training), as torch does.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _ops

ops = torch.ops.regdrop


def _check_probability(p: float, name: str = "dropout probability") -> None:
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} has to be between 0 and 1, but got {p}")


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p).

    One pass over ``input``; autograd saves a 1-bit-per-element mask. Dropped
    elements are exactly 0 even where ``input`` is NaN or Inf.

    Args:
        input: a float32, float64, float16 or bfloat16 tensor.
        p: probability of an element to be zeroed. Default: 0.5
        training: apply dropout if ``True``. Default: ``True``
        inplace: overwrite ``input`` (no output allocation). Refused for inputs
            whose elements share memory (e.g. from ``expand()``). Default: ``False``
        generator: the ``torch.Generator`` to draw from; default: the device's.
    """
    _check_probability(p)
    if not training or p == 0.0:
        return input
    if inplace:
        return _ops.DropoutInplace.apply(input, p, generator)
    return ops.dropout(input, p, generator)[0]
