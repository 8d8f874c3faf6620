"""The module layer: thin modules that store arguments and call functional.

Each subclasses its torch counterpart, so constructor arguments, ``extra_repr``,
``state_dict`` and ``isinstance`` checks stay those of torch.
"""

import torch
from torch import Tensor

from . import functional as F


class Dropout(torch.nn.Dropout):
    """Drop-in for :class:`torch.nn.Dropout`, fused and with a 1-bit mask.

    Args:
        p: probability of an element to be zeroed. Default: 0.5
        inplace: overwrite the input instead of allocating an output. Default: ``False``
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)
