"""The op table: one entry per fused op, and the implementations timed for it.

Each entry is timed through these variants (results.VARIANTS):
- ``eager``: the PyTorch expression it replaces (eager.py), through autograd;
- ``compile``: that expression under ``torch.compile``;
- ``aten``: native kernels called directly (dropout: ``aten.native_dropout``
  and ``native_dropout_backward``);
- ``module``: the regdrop_ext module, through autograd, as a model calls it;
- ``low_memory``: that module saving no mask (dropout and dropout_add);
- ``raw``: the ops ``torch.ops.regdrop.<op>`` and ``<backward>``.

An entry whose regdrop ops are not registered is skipped with a note, and so
is an implementation whose regdrop_ext module does not exist.
"""

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import regdrop_ext

from . import eager
from .checks import element_keep_from_output, keep_from_bits, keep_from_elements
from .results import VARIANTS
from .saved import saved_for_backward

# The anchor shape is 16 x 2048 x 4096 (134,217,728 elements).
HIDDEN = 4096
BATCH = 16
CHANNEL_PLANE = (64, 64)

# The order of the gradients a raw backward op returns.
GRAD_NAMES = ("input", "bias")


def shape_for(numel: int, unit: str) -> Tuple[int, ...]:
    """(batch, rows, hidden) with up to 16 samples; (N, C, 64, 64) for channels."""
    hidden = HIDDEN if numel % HIDDEN == 0 else numel
    rows = numel // hidden
    batch = math.gcd(rows, BATCH)
    if unit == "channel":
        plane = CHANNEL_PLANE if hidden == HIDDEN else (1, hidden)
        return (batch, rows // batch) + plane
    return (batch, rows // batch, hidden)


def positive(shape, dtype, device) -> Tensor:
    """Values in [0.5, 1.5]: never 0 and never cancelling, so a kept unit is
    visible in any output (checks.py)."""
    return torch.empty(shape, dtype=dtype, device=device).uniform_(0.5, 1.5)


def positive_like(t: Tensor) -> Tensor:
    return positive(t.shape, t.dtype, t.device)


def make_operands(names, shape, dtype, device, dtypes=None) -> Dict[str, Tensor]:
    """The op's tensor operands; a bias spans the last dimension. ``dtypes``
    overrides some operands' dtype (the autocast mix)."""
    dtypes = dtypes or {}
    return {
        name: positive(shape[-1:] if name == "bias" else shape, dtypes.get(name, dtype), device) for name in names
    }


class AutogradCall:
    """An Autograd implementation bound to one cell's operands."""

    def __init__(self, fn, operands: Dict[str, Tensor]):
        self.fn = fn
        self.leaves = {name: t.detach().requires_grad_() for name, t in operands.items()}

    def forward(self):
        return self.fn(*self.leaves.values()), None

    def backward(self, output, mask, grad, retain: bool) -> Dict[str, Tensor]:
        leaves = list(self.leaves.values())
        return dict(zip(self.leaves, torch.autograd.grad(output, leaves, grad, retain_graph=retain)))

    def saved_forward(self):
        """A forward, and the tensors autograd saved for its backward."""
        return saved_for_backward(self.forward)

    def unit_keep(self, output, mask, units: int) -> Tensor:
        return keep_from_elements(element_keep_from_output(output, self.leaves), units)


@dataclass(frozen=True)
class Autograd:
    """Called as a model calls it: the operands require grad and autograd saves
    what backward needs. ``make(p)`` returns a function of the operands."""

    label: str
    variant: str
    make: Callable[[float], Callable[..., Tensor]]
    module: Optional[str] = None  # the regdrop_ext attribute it needs

    def missing(self) -> Optional[str]:
        if self.module and not hasattr(regdrop_ext, self.module):
            return f"regdrop_ext.{self.module} does not exist yet"
        return None

    def bind(self, operands: Dict[str, Tensor], p: float) -> AutogradCall:
        fn = self.make(p)
        if self.variant == "compile":
            # A fresh compile for every size and dtype: past the recompile
            # limit, torch.compile would silently run the eager function.
            torch.compiler.reset()
            fn = torch.compile(fn, dynamic=False)
        return AutogradCall(fn, operands)


class RawCall:
    """A RawOp bound to one cell's operands."""

    def __init__(self, raw: "RawOp", operands: Dict[str, Tensor], p: float):
        self.raw, self.operands, self.p = raw, operands, p

    def forward(self):
        return self.raw.forward(*self.operands.values(), self.p)

    def backward(self, output, mask, grad, retain: bool) -> Dict[str, Tensor]:
        grads = self.raw.backward(grad, mask, self.p)
        return dict(zip(GRAD_NAMES, (grads,) if isinstance(grads, Tensor) else grads))

    def saved_forward(self):
        """A forward; what its backward needs is its mask."""
        output, mask = self.forward()
        return (output, mask), [mask]

    def unit_keep(self, output, mask, units: int) -> Tensor:
        if self.raw.mask_bits:
            return keep_from_bits(mask, units)
        return keep_from_elements(mask != 0, units)


@dataclass(frozen=True)
class RawOp:
    """Called as ops: ``forward(*operands, p) -> (output, mask)`` and
    ``backward(grad, mask, p) -> grad_input`` or ``(grad_input, grad_bias)``."""

    label: str
    variant: str
    forward: Callable
    backward: Callable
    mask_bits: bool  # regdrop's 1 bit per unit; else one mask element per input element

    def missing(self) -> Optional[str]:
        return None

    def bind(self, operands: Dict[str, Tensor], p: float) -> RawCall:
        return RawCall(self, operands, p)


def _module(name: str, variant: str = "module", **options) -> Autograd:
    arguments = ", ".join(f"{k}={v}" for k, v in options.items())
    return Autograd(
        f"regdrop_ext.{name}" + (f"({arguments})" if arguments else ""),
        variant,
        lambda p: getattr(regdrop_ext, name)(p, **options),
        module=name,
    )


@dataclass(frozen=True)
class Op:
    """A regdrop op: ``torch.ops.regdrop.<name>(*operands, p) -> (output, mask)``
    with backward ``torch.ops.regdrop.<backward>(grad, mask, p)``; one mask bit
    per ``unit``: "element", "sample" (along dim 0) or "channel" ((n, c))."""

    name: str
    backward: str
    unit: str
    operands: Tuple[str, ...]
    eager: Callable[..., Tensor]
    eager_label: str
    module: str
    extras: Tuple[object, ...] = ()
    # The autocast mix: a float32 residual beside a 16-bit input (the row runs
    # for 16-bit dtypes only), under its own key in the tables and --ops.
    float32_residual: bool = False

    @property
    def key(self) -> str:
        return f"{self.name}_fp32_residual" if self.float32_residual else self.name

    def operand_dtypes(self) -> Dict[str, torch.dtype]:
        return {"residual": torch.float32} if self.float32_residual else {}

    def runs_for(self, dtype: torch.dtype) -> bool:
        return not self.float32_residual or dtype in (torch.float16, torch.bfloat16)

    def missing(self) -> Optional[str]:
        for name in (self.name, self.backward):
            if not hasattr(torch.ops.regdrop, name):
                return f"torch.ops.regdrop.{name} is not registered yet"
        return None

    def implementations(self) -> List[object]:
        """In VARIANTS order: the native ones first, then ours."""
        expression = self.eager

        def with_p(p: float):
            return lambda *operands: expression(*operands, p)

        regdrop = torch.ops.regdrop
        impls = [
            Autograd(self.eager_label, "eager", with_p),
            Autograd(f"torch.compile({self.eager_label})", "compile", with_p),
            *self.extras,
            _module(self.module),
            RawOp(
                f"regdrop.{self.name}",
                "raw",
                getattr(regdrop, self.name),
                getattr(regdrop, self.backward),
                mask_bits=True,
            ),
        ]
        return sorted(impls, key=lambda impl: list(VARIANTS).index(impl.variant))


DROPOUT_ADD = Op(
    name="dropout_add",
    backward="dropout_backward",
    unit="element",
    operands=("input", "residual"),
    eager=eager.dropout_add,
    eager_label="r + F.dropout(x)",
    module="DropoutAdd",
    extras=(_module("DropoutAdd", "low_memory", low_memory=True),),
)

OPS = (
    Op(
        name="dropout",
        backward="dropout_backward",
        unit="element",
        operands=("input",),
        eager=eager.dropout,
        eager_label="F.dropout(x)",
        module="Dropout",
        extras=(
            RawOp(
                "aten.native_dropout",
                "aten",
                eager.native_dropout,
                eager.native_dropout_backward,
                mask_bits=False,
            ),
            _module("Dropout", "low_memory", low_memory=True),
        ),
    ),
    DROPOUT_ADD,
    replace(DROPOUT_ADD, extras=(), float32_residual=True),
    Op(
        name="bias_dropout_add",
        backward="bias_dropout_add_backward",
        unit="element",
        operands=("input", "bias", "residual"),
        eager=eager.bias_dropout_add,
        eager_label="r + F.dropout(x + b)",
        module="BiasDropoutAdd",
    ),
    Op(
        name="drop_path",
        backward="drop_path_backward",
        unit="sample",
        operands=("input",),
        eager=eager.drop_path,
        eager_label="timm drop_path(x)",
        module="DropPath",
    ),
    Op(
        name="drop_path_add",
        backward="drop_path_backward",
        unit="sample",
        operands=("input", "residual"),
        eager=eager.drop_path_add,
        eager_label="r + timm drop_path(x)",
        module="DropPathAdd",
    ),
    Op(
        name="channel_dropout",
        backward="channel_dropout_backward",
        unit="channel",
        operands=("input",),
        eager=eager.channel_dropout,
        eager_label="F.dropout2d(x)",
        module="Dropout2d",
    ),
)
