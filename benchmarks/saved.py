"""What a call saves for backward, and how many bytes a call moves.

Saved tensors are measured, never assumed: autograd hands every tensor it
saves to ``saved_tensors_hooks``. Bytes are counted once per distinct tensor
(by address and size), so a gradient passed through unchanged, or an input
that is also saved, is not counted twice.
"""

from typing import Callable, Iterable, List, Tuple

import torch
from torch import Tensor


def distinct(tensors: Iterable[Tensor]) -> List[Tensor]:
    seen = {}
    for t in tensors:
        seen.setdefault((t.data_ptr(), t.nbytes), t)
    return list(seen.values())


def total_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.nbytes for t in distinct(tensors))


def saved_for_backward(fn: Callable[[], object]) -> Tuple[object, List[Tensor]]:
    """Run ``fn`` and return its result and the distinct tensors autograd saved."""
    saved = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, distinct(saved)
