"""Which random ops one forward of a model runs, where, and whether regdrop_ext draws them.

``convert`` swaps dropout *layers*. Without ``functional=True`` it cannot
reach dropout that a model calls as a function (``F.dropout(x,
self.drop_rate, self.training)`` in a classifier head,
``F.scaled_dot_product_attention(..., dropout_p=...)`` in fused attention),
and it cannot tell whether a layer it replaced is ever called (timm keeps
``attn_drop`` but does not call it when fused attention is on). Only a
forward can tell, so ``trace_random_ops`` runs one on an example input:

- a TorchDispatchMode sees every op that draws random numbers: those tagged
  ``nondeterministic_seeded``, attention ops only when ``dropout_p > 0``;
- module hooks say which module was running;
- a TorchFunctionMode records the torch function the model's own code
  called, which is what one would change: ``torch.nn.functional.dropout``,
  not the ``aten.bernoulli_`` it runs on the CPU; for a call that
  ``convert(..., functional=True)`` routes, the routing mode names it.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .dropout_layers import dropout_probability, is_dropout_layer
from .routing import FunctionalDropoutRouting, routing_of

__all__ = ["RandomCall", "RandomOpTrace", "trace_random_ops"]


@dataclass(frozen=True)
class RandomCall:
    """The random ops drawn at one place of the forward."""

    module: str  # qualified name of the innermost running module; "" is the model itself
    module_type: str  # its class name
    function: str  # the torch function that the module's code called
    op: str  # the op that drew the random numbers: "aten.bernoulli_.float", "regdrop.dropout.default"
    count: int  # how many times in the forward

    @property
    def fused(self) -> bool:
        """Drawn by a regdrop_ext kernel."""
        return self.op.startswith("regdrop.")

    def __str__(self) -> str:
        times = f" x{self.count}" if self.count > 1 else ""
        return f"{self.module or '<model>'} ({self.module_type}): {self.function} -> {self.op}{times}"


@dataclass
class RandomOpTrace:
    """What :func:`trace_random_ops` saw in one forward."""

    calls: list[RandomCall]  # in the order they first ran
    never_called: dict[str, nn.Module]  # name -> dropout layer with p != 0 that no forward call reached

    @property
    def native(self) -> list[RandomCall]:
        """Random ops that torch's kernels drew: not converted, or not convertible."""
        return [call for call in self.calls if not call.fused]

    @property
    def fused(self) -> list[RandomCall]:
        return [call for call in self.calls if call.fused]

    def __str__(self) -> str:
        native, fused = (sum(call.count for call in calls) for calls in (self.native, self.fused))
        lines = [f"one forward: {native + fused} random ops, {fused} by regdrop_ext, {native} native"]
        if self.native:
            lines.append("native:")
            lines += [f"  {call}" for call in self.native]
        if self.never_called:
            lines.append(f"dropout layers never called: {len(self.never_called)} (converting them changes nothing)")
            lines += [f"  {name or '<model>'}: {layer}" for name, layer in self.never_called.items()]
        return "\n".join(lines)


def _draws_random_numbers(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    if torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    if not any(isinstance(result.type, torch.TensorType) for result in op._schema.returns):
        return False  # aten._fused_sdp_choice: tagged for its dropout_p, draws nothing
    # Attention ops are tagged for their dropout, which dropout_p == 0 turns off.
    for i, argument in enumerate(op._schema.arguments):
        if argument.name == "dropout_p":
            default = argument.default_value if argument.has_default_value() else 0.0
            return kwargs.get("dropout_p", args[i] if i < len(args) else default) > 0
    return True


class _OutermostFunction(TorchFunctionMode):
    """The torch function that the model's code is in: while it runs, the
    torch functions it calls are not seen by this mode."""

    current = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        outer, self.current = self.current, resolve_name(func) or str(func)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.current = outer


class _RandomOpRecorder(TorchDispatchMode):
    def __init__(self, where, function: _OutermostFunction, routing: Optional[FunctionalDropoutRouting]) -> None:
        super().__init__()
        self.where = where  # () -> the running module
        self.function = function
        self.routing = routing
        self.counts: dict[tuple[nn.Module, str, str], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _draws_random_numbers(func, args, kwargs):
            # A routed call is answered by the routing mode, above this trace's function mode.
            rerouted = self.routing.rerouting if self.routing is not None else ""
            key = (self.where(), rerouted or self.function.current or str(func), str(func))
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **kwargs)


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def trace_random_ops(model: nn.Module, *args, **kwargs) -> RandomOpTrace:
    """Run ``model(*args, **kwargs)`` once and report every random op it ran:
    where (the innermost module), through which torch function, and whether a
    regdrop_ext kernel or a native one drew it; and the dropout layers (p != 0)
    that the forward never called.

    Call it with the model in the mode of interest (``model.train()`` for
    training; under :func:`regdrop_ext.mc_dropout` for Monte Carlo dropout).
    It runs without gradients on copies of the tensor arguments, and leaves
    them, the model's parameters and buffers (BatchNorm statistics) and the
    random generators as they were. A
    ``torch.compile`` wrapper is traced through its eager module. Ops are
    those of this forward, on this input and device: other inputs may take
    other paths.

    Example::

        model, summary = regdrop_ext.convert(model)
        print(regdrop_ext.trace_random_ops(model.train(), example_batch))
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    names = {module: name for name, module in model.named_modules()}  # each module once, by its first name
    running: list[nn.Module] = []
    called: set[nn.Module] = set()

    def enter(module, inputs):
        running.append(module)
        called.add(module)

    def leave(module, inputs, output):
        running.pop()

    hooks = [module.register_forward_pre_hook(enter) for module in names]
    hooks += [module.register_forward_hook(leave, always_call=True) for module in names]
    function = _OutermostFunction()
    recorder = _RandomOpRecorder(lambda: running[-1] if running else model, function, routing_of(model))
    # Copies: a model that drops out in place must not write into the caller's tensors.
    args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, (args, kwargs))
    state = list(model.parameters()) + list(model.buffers()) + list(_tensors((args, kwargs)))
    cuda_devices = sorted({t.device.index or 0 for t in state if t.is_cuda})
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}  # BatchNorm updates the clones
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices), function, recorder:
            torch.func.functional_call(model, buffers, args, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    calls = [
        RandomCall(names[module], type(module).__name__, function_name, op, count)
        for (module, function_name, op), count in recorder.counts.items()
    ]
    never_called = {
        name: module
        for module, name in names.items()
        if module not in called and is_dropout_layer(module) and dropout_probability(module) != 0
    }
    return RandomOpTrace(calls, never_called)
