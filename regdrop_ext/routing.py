"""Dropout that a model calls as a function, drawn by regdrop_ext.

``convert`` swaps layers. Dropout called inside a forward (``F.dropout(x,
self.drop_rate, self.training)`` in timm's classifier heads,
``nn.functional.dropout`` in Hugging Face's eager attention and Swin's,
``dropout_p`` of ``F.scaled_dot_product_attention``) is no layer. While a
routed model's forward runs, a TorchFunctionMode answers those calls:

- ``F.dropout``, ``F.dropout1d/2d/3d`` and ``torch.dropout`` with
  ``regdrop_ext.functional`` (same arguments, same semantics) for the tensors
  regdrop_ext takes (float32, float64, float16, bfloat16; strided); other
  tensors go to torch's;
- ``F.scaled_dot_product_attention`` with ``dropout_p > 0``, on request
  (``attention``): its math path with regdrop_ext's dropout on the weights
  (:mod:`regdrop_ext.attention`), where SDPA would run the math path anyway
  (``"math"``: the CPU; inputs no fused GPU kernel takes) or everywhere
  (``"always"``: fused GPU kernels given up). Otherwise SDPA keeps its dropout;
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): its body
  runs with the mode on, so its ``F.dropout`` (``need_weights=True``) and its
  SDPA call (``need_weights=False``) are answered as above.

A forward pre-hook enters the mode and a forward hook (``always_call``) leaves
it: ``torch.compile`` traces both (``fullgraph=True`` holds) and then draws
regdrop_ext's masks, which equal eager's. TorchScript runs no Python mode:
``torch.jit.script`` compiles the model without the hooks, and there the
functional dropout is torch's again.
"""

import functools
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name

from . import attention as regdrop_attention
from . import functional

__all__ = ["ATTENTION_CHOICES", "FunctionalDropoutRouting", "is_routing_hook", "route", "routing_of"]

# What happens to SDPA's dropout_p: "sdpa" leaves it to SDPA; "math" computes
# SDPA's math path with regdrop_ext's dropout where SDPA would run it anyway;
# "always" does so on every device.
ATTENTION_CHOICES = ("sdpa", "math", "always")

_TAKEN_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _torch_dropout(input: Tensor, p: float, train: bool) -> Tensor:
    return functional.dropout(input, p, train)


_DROPOUT_ROUTES = {
    F.dropout: functional.dropout,
    F.dropout1d: functional.dropout1d,
    F.dropout2d: functional.dropout2d,
    F.dropout3d: functional.dropout3d,
    torch.dropout: _torch_dropout,
}


def _without_own_torch_function_check(function):
    """``function`` (a Python function of torch.nn.functional) whose own
    ``has_torch_function`` check says no: run inside the mode, its body's calls
    reach the mode, where calling ``function`` itself would hand the whole
    call to the mode again, endlessly."""
    globals_ = dict(function.__globals__, has_torch_function=lambda *args: False)
    body = types.FunctionType(function.__code__, globals_, function.__name__, function.__defaults__, function.__closure__)
    body.__kwdefaults__ = function.__kwdefaults__
    return body


# Resolved once: resolve_name mutates the warning filters, which torch.compile cannot trace.
_NAMES = {func: resolve_name(func) for func in (*_DROPOUT_ROUTES, F.scaled_dot_product_attention)}
_MULTI_HEAD_ATTENTION_BODY = _without_own_torch_function_check(F.multi_head_attention_forward)
_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _taken(input) -> bool:
    return (
        isinstance(input, Tensor) and input.dtype in _TAKEN_DTYPES and input.layout == torch.strided and not input.is_nested
    )


class FunctionalDropoutRouting(TorchFunctionMode):
    """Answers functional dropout (``functional``) and SDPA's dropout
    (``attention``, one of :data:`ATTENTION_CHOICES`) with regdrop_ext's ops.
    ``rerouting`` names the torch function being answered, for
    :func:`regdrop_ext.trace_random_ops`."""

    def __init__(self, functional: bool = True, attention: str = "sdpa") -> None:
        super().__init__()
        self.choose(functional, attention)
        self.rerouting = ""

    def choose(self, functional: bool, attention: str) -> None:
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
        self.functional = functional
        self.attention = attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.functional and func in _DROPOUT_ROUTES and _taken(args[0] if args else kwargs.get("input")):
            return self._answer(func, _DROPOUT_ROUTES[func], args, kwargs)
        if func is F.scaled_dot_product_attention and self.attention != "sdpa":
            bound = dict(zip(_SDPA_ARGUMENTS, args), **kwargs)
            if bound.get("dropout_p", 0.0) > 0 and _taken(bound["query"]):
                if self.attention == "always" or regdrop_attention.math_path_runs(**bound):
                    return self._answer(func, regdrop_attention.scaled_dot_product_attention, args, kwargs)
        if func is F.multi_head_attention_forward:
            with self:
                return _MULTI_HEAD_ATTENTION_BODY(*args, **kwargs)
        if getattr(func, "__module__", None) == "torch._tensor" and args and isinstance(args[0], Tensor):
            # A Tensor method written in Python (unflatten, split, ...), called as
            # a method: torch.compile traces that, where it cannot inline the
            # function's super() call.
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)

    def _answer(self, func, regdrop_function, args, kwargs):
        outer, self.rerouting = self.rerouting, _NAMES[func]
        try:
            return regdrop_function(*args, **kwargs)
        finally:
            self.rerouting = outer


class _Routing:
    """The hook pair that enters and leaves the mode around a model's forward,
    and what ``torch.jit.script`` compiles instead: the model without them."""

    def __init__(self, mode: FunctionalDropoutRouting) -> None:
        self.mode = mode

    def enter(self, module, args):
        self.mode.__enter__()

    def leave(self, module, args, output):
        self.mode.__exit__(None, None, None)

    def scriptable(self, model: nn.Module) -> nn.Module:
        """A shallow copy of ``model`` (same submodules, parameters and buffers)
        without the hooks, for ``torch.jit.script``'s ``__prepare_scriptable__``."""
        copy = model.__class__.__new__(model.__class__)
        copy.__dict__ = dict(model.__dict__)
        del copy.__dict__["__prepare_scriptable__"]
        copy._modules = dict(model._modules)  # script may replace entries; the model's own stay
        for name in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(model, name)
            setattr(copy, name, type(hooks)((key, hook) for key, hook in hooks.items() if not is_routing_hook(hook)))
        return copy


def is_routing_hook(hook) -> bool:
    """Whether ``hook`` is one of the pair that :func:`route` registers."""
    return isinstance(getattr(hook, "__self__", None), _Routing)


def routing_of(model: nn.Module) -> Optional[FunctionalDropoutRouting]:
    """The routing mode :func:`route` put on ``model``, if any."""
    for hook in model._forward_pre_hooks.values():
        if is_routing_hook(hook):
            return hook.__self__.mode
    return None


def route(model: nn.Module, functional: bool = True, attention: str = "sdpa") -> FunctionalDropoutRouting:
    """Answer the functional dropout of ``model``'s forward with regdrop_ext's
    ops (see the module docstring); a model already routed gets the new choices."""
    mode = routing_of(model)
    if mode is not None:
        mode.choose(functional, attention)
        return mode
    mode = FunctionalDropoutRouting(functional, attention)
    routing = _Routing(mode)
    model.register_forward_pre_hook(routing.enter, prepend=True)
    model.register_forward_hook(routing.leave, always_call=True)
    # torch.jit.script calls it before compiling: the hooks are Python only.
    model.__prepare_scriptable__ = functools.partial(routing.scriptable, model)
    return mode
