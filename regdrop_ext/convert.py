"""Swap a model's dropout layers for the fused ones, and on request route the
dropout its forward calls as a function.

torch's ``nn.Dropout`` and ``nn.Dropout1d/2d/3d``, timm's ``DropPath`` and
torchvision's ``StochasticDepth`` in "row" mode become their regdrop_ext
equivalents with the same probability, ``inplace`` flag, training mode and
hooks. These layers hold no parameters or buffers, so the state_dict is
unchanged. ``functional=True`` and ``attention=`` reach the dropout that is
no layer (:mod:`regdrop_ext.routing`).
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from . import modules, routing
from .dropout_layers import stochastic_depth_class, timm_drop_path_classes, training_but_statistics
from .trace import RandomOpTrace, trace_random_ops

__all__ = ["ConversionSummary", "convert"]

_TORCH_DROPOUT = {
    nn.Dropout: modules.Dropout,
    nn.Dropout1d: modules.Dropout1d,
    nn.Dropout2d: modules.Dropout2d,
    nn.Dropout3d: modules.Dropout3d,
}
_FUSED = (*_TORCH_DROPOUT.values(), modules.DropPath, modules.DropoutAdd, modules.BiasDropoutAdd)
# Everything _call_impl consults; a replacement takes these very dicts, so the
# handles that registered the hooks still remove them.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class ConversionSummary:
    """What :func:`convert` did, by qualified module name ("" is the model itself)."""

    replaced: dict[str, tuple[type, type]] = field(default_factory=dict)  # name -> (old type, new type)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was left alone
    hooks_moved: dict[str, int] = field(default_factory=dict)  # name -> hooks now on the replacement
    routed: Optional[str] = None  # what the forward's functional dropout goes to; None: not routed
    # With example inputs: one training forward of the converted model, and
    # the replaced layers that it never called (replacing them changes nothing).
    trace: Optional[RandomOpTrace] = None
    never_called: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        never = set(self.never_called)
        if self.trace is None:
            counts = f"replaced {len(self.replaced)}"
        else:
            counts = f"replaced {len(self.replaced) - len(never)} that run (+{len(never)} never called)"
        lines = [f"{counts}, left alone {len(self.skipped)}"]
        lines += [
            f"  {name or '<model>'}: {_type_name(old)} -> {_type_name(new)}" + (" (never called)" if name in never else "")
            for name, (old, new) in self.replaced.items()
        ]
        lines += [f"  {name or '<model>'}: left alone, {reason}" for name, reason in self.skipped.items()]
        lines += [f"  {name or '<model>'}: {count} hook(s) moved to the replacement" for name, count in self.hooks_moved.items()]
        if self.routed is not None:
            lines.append(f"functional dropout: {self.routed}")
        if self.trace is None:
            lines.append(CANNOT_SEE)
        else:
            lines.append(f"example input, training mode: {self.trace}")
        return "\n".join(lines)


CANNOT_SEE = (
    "(layers only: dropout the model calls as a function stays native unless functional=True, and a replaced "
    "layer may never be called; convert(..., example_args=...) or regdrop_ext.trace_random_ops shows both)"
)


def _fused(module: nn.Module) -> tuple[Optional[nn.Module], Optional[str]]:
    """``(replacement, None)``, ``(None, reason)`` for a dropout layer left
    alone, or ``(None, None)`` for a module that is not a dropout layer."""
    kind = type(module)  # exact types: a subclass may change forward
    if kind in _TORCH_DROPOUT:
        return _TORCH_DROPOUT[kind](module.p, module.inplace), None
    if kind in timm_drop_path_classes():
        # timm before 0.6 had no scale_by_keep and always scaled.
        return modules.DropPath(module.drop_prob, getattr(module, "scale_by_keep", True)), None
    if kind is stochastic_depth_class():
        if module.mode == "row":
            return modules.DropPath(module.p, scale_by_keep=True), None
        return None, "StochasticDepth mode='batch' drops the whole batch at once; no fused equivalent"
    if isinstance(module, _FUSED):
        return None, "already a regdrop_ext layer"
    if isinstance(module, (nn.AlphaDropout, nn.FeatureAlphaDropout)):
        return None, f"{kind.__name__} keeps SELU's mean and variance; no fused equivalent"
    if isinstance(module, tuple(_TORCH_DROPOUT)):
        return None, f"{kind.__qualname__} subclasses a torch dropout and may change its forward"
    return None, None


def _move_hooks(old: nn.Module, new: nn.Module) -> int:
    for name in _HOOK_DICTS:
        setattr(new, name, getattr(old, name))
    new._is_full_backward_hook = old._is_full_backward_hook  # which kind _backward_hooks holds
    return len(old._forward_pre_hooks) + len(old._forward_hooks) + len(old._backward_pre_hooks) + len(old._backward_hooks)


def _describe_routing(functional: bool, attention: str) -> str:
    calls = "F.dropout, F.dropout1d/2d/3d and torch.dropout by regdrop_ext" if functional else "left to torch"
    sdpa = {
        "sdpa": "SDPA's dropout_p left to SDPA",
        "math": "SDPA's dropout_p by regdrop_ext where SDPA runs its math path (CPU), else left to SDPA",
        "always": "SDPA computed by its math path with regdrop_ext's dropout on every device",
    }[attention]
    return f"{calls}; {sdpa}"


def convert(
    model: nn.Module,
    *,
    inplace: bool = True,
    functional: bool = False,
    attention: str = "sdpa",
    example_args: Optional[tuple] = None,
    example_kwargs: Optional[dict[str, Any]] = None,
) -> tuple[nn.Module, ConversionSummary]:
    """Replace the dropout layers of ``model`` with regdrop_ext's fused ones.

    Each replacement keeps its layer's probability, ``inplace`` flag,
    training mode and hooks (forward, forward pre- and backward hooks move to
    the replacement, and their handles still remove them); a layer shared by
    several parents stays shared.

    Args:
        model: the model to convert; it may itself be a dropout layer.
        inplace: change ``model`` itself; ``False`` converts a deep copy and
            leaves ``model`` untouched. Default: ``True``
        functional: also draw the dropout that the model's forward calls as a
            function (``F.dropout``, ``F.dropout1d/2d/3d``, ``torch.dropout``,
            inside ``nn.MultiheadAttention`` too) with regdrop_ext's ops: a
            TorchFunctionMode entered around the forward by hooks
            (:mod:`regdrop_ext.routing`). ``F.alpha_dropout`` and
            ``F.feature_alpha_dropout`` stay torch's. Default: ``False``
        attention: the dropout inside ``F.scaled_dot_product_attention`` (and
            so ``nn.MultiheadAttention(need_weights=False)``): ``"sdpa"``
            leaves it to SDPA; ``"math"`` computes SDPA's math path with
            regdrop_ext's dropout where SDPA would run the math path anyway
            (the CPU, and inputs no fused GPU kernel takes), leaving fused
            kernels fused; ``"always"`` does so on every device, giving up the
            fused GPU kernels. Default: ``"sdpa"``
        example_args, example_kwargs: inputs for one training-mode forward of
            the converted model (BatchNorm and InstanceNorm kept in eval mode;
            :func:`trace_random_ops`: without gradients, leaving the model and
            the generators as they were): the summary
            then counts the replaced layers that run apart from those never
            called, and lists the random ops left native.

    Returns:
        ``(converted model, ConversionSummary)``. The converted model is
        ``model`` itself unless ``inplace=False`` or ``model`` is a dropout layer.

    Without ``functional=True``, dropout that the model calls as a function
    stays native: ``F.dropout(x, self.drop_rate, self.training)`` in timm's
    classifier heads, ``nn.functional.dropout`` in Hugging Face's eager
    attention and Swin's. Without ``attention="math"``, so does SDPA's
    ``dropout_p`` (timm, Hugging Face, torchvision). A replaced layer may
    also never be called: timm keeps ``attn_drop`` but passes its ``p`` to
    fused attention.

    The converted model compiles with ``torch.compile`` (``fullgraph=True``
    too) and ``torch.jit.script`` wherever the original did (``torch.jit.load``
    needs ``import regdrop_ext`` first: it registers the ops). Scripted,
    ``inplace=True`` layers compute out of place and copy the result back, and
    the routing of functional dropout is left out: TorchScript runs no Python
    mode, so functional dropout is torch's there.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if attention not in routing.ATTENTION_CHOICES:
        raise ValueError(f"convert: attention must be one of {routing.ATTENTION_CHOICES}, got {attention!r}")
    if example_args is not None and not isinstance(example_args, tuple):
        raise TypeError(f"convert: example_args must be a tuple of positional inputs, got {type(example_args).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"convert: example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    summary = ConversionSummary()
    replacements = {}  # old layer -> its replacement

    def visit(name: str, module: nn.Module) -> Optional[nn.Module]:
        if module not in replacements:
            new, reason = _fused(module)
            if new is not None:
                new.train(module.training)
                moved = _move_hooks(module, new)
                if moved:
                    summary.hooks_moved[name] = moved
                replacements[module] = new
                summary.replaced[name] = (type(module), type(new))
            elif reason is not None:
                summary.skipped[name] = reason
        return replacements.get(module)

    for name, module in list(model.named_modules(remove_duplicate=False)):
        new = visit(name, module)
        if new is None:
            continue
        if not name:
            model = new
            break
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, new)
    if functional or attention != "sdpa":
        routing.route(model, functional, attention)
        summary.routed = _describe_routing(functional, attention)
    if example_args is not None or example_kwargs is not None:
        with training_but_statistics(model):
            summary.trace = trace_random_ops(model, *(example_args or ()), **(example_kwargs or {}))
        never = set(summary.trace.never_called)
        summary.never_called = [name for name in summary.replaced if name in never]
    return model, summary
