"""The op manifest, as Python reads it: csrc/include/regdrop/manifest.h, handed
over by the compiled library (``_C.manifest()``), so the C++ table is the only
place an op is declared. The vmap and DTensor rules and the tests read it.

Every op is an :class:`Op`:

* ``variant``: ``"masked"`` (a forward op: ``(output, mask)``), ``"in_place"``
  (``name_``: ``(input, mask)``, input overwritten), ``"low_memory"``
  (``(output, rng_state)``), ``"backward"`` (``(grad, mask, p)``) or
  ``"low_memory_backward"`` (``(grad, rng_state, p, *, shard)``);
* ``unit``: what one mask bit stands for: ``"element"``, ``"sample"`` (a slice
  along dim 0, drop-path) or ``"channel"`` (an (n, c) of an (N, C, *) tensor);
* ``residual``, ``bias``: a forward op's operands (``residual + dropout(input
  [+ bias])``); a backward op's ``bias``: it returns the bias gradient too;
* ``forward``: the manifest row it comes from; ``backward``: the op its
  gradient goes through;
* ``family``: ``"elementwise"`` (the ops above, one kernel call each), or
  ``"norm"`` (dropout + residual + LayerNorm / RMSNorm, a pass over each
  row: ``regdrop_ext.norm``), whose unit kind and operands are arguments.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from . import _C

ELEMENT, SAMPLE, CHANNEL = "element", "sample", "channel"


@dataclass(frozen=True)
class Op:
    name: str
    family: str
    variant: str
    unit: str
    residual: bool
    bias: bool
    forward: str
    backward: str

    @property
    def op(self):
        """The op itself: ``torch.ops.regdrop.<name>``."""
        return getattr(torch.ops.regdrop, self.name)

    @property
    def is_forward(self) -> bool:
        return self.variant in ("masked", "in_place", "low_memory")

    @property
    def scale_by_keep(self) -> bool:
        """Takes timm's ``scale_by_keep`` after ``p`` (sample units)."""
        return self.unit == SAMPLE

    @property
    def tensors(self) -> Tuple[str, ...]:
        """The names of its tensor arguments, in schema order."""
        if self.is_forward:
            return ("input",) + (("bias",) if self.bias else ()) + (("residual",) if self.residual else ())
        return ("grad", "rng_state" if self.variant == "low_memory_backward" else "mask")

    def units(self, shape) -> int:
        """The units of a tensor of ``shape``: its elements, samples (dim 0) or
        channels (N * C); 0 for a shape without them, which the op refuses."""
        if self.unit == SAMPLE:
            return shape[0] if len(shape) >= 1 else 0
        if self.unit == CHANNEL:
            return shape[0] * shape[1] if len(shape) >= 2 else 0
        return math.prod(shape)

    def new_mask(self, like: torch.Tensor) -> torch.Tensor:
        """A mask for ``like``'s units (ceil(units / 8) bytes), as an in-place op takes it to write."""
        return like.new_empty(((self.units(like.shape) + 7) // 8,), dtype=torch.uint8)

    def bind(self, args, kwargs) -> Dict[str, Any]:
        """A call's arguments by name, defaults included."""
        bound = {}
        for k, arg in enumerate(self.op.default._schema.arguments):
            if k < len(args):
                bound[arg.name] = args[k]
            elif arg.name in kwargs:
                bound[arg.name] = kwargs[arg.name]
            elif arg.has_default_value():
                bound[arg.name] = arg.default_value
        return bound

    def arguments(self, bound: Dict[str, Any]):
        """(args, kwargs) of a call with these arguments by name (bind's):
        positional and keyword-only as its schema has them; others ignored."""
        args, kwargs = [], {}
        for arg in self.op.default._schema.arguments:
            if arg.name not in bound:
                continue
            if arg.kwarg_only:
                kwargs[arg.name] = bound[arg.name]
            else:
                args.append(bound[arg.name])
        return args, kwargs

    def call(self, bound: Dict[str, Any]):
        """The op on arguments by name (bind's)."""
        args, kwargs = self.arguments(bound)
        return self.op(*args, **kwargs)


OPS: Dict[str, Op] = {entry["name"]: Op(**entry) for entry in _C.manifest()}


def ops(*variants: str, family: str = "elementwise") -> Tuple[Op, ...]:
    """The ops of ``family`` and of the given variants (every one without any), in manifest order."""
    return tuple(op for op in OPS.values() if op.family == family and (not variants or op.variant in variants))


def find(unit: str, residual: bool, bias: bool = False, variant: str = "masked"):
    """The op with these unit and operands, or None."""
    return next((op for op in ops(variant) if (op.unit, op.residual, op.bias) == (unit, residual, bias)), None)
