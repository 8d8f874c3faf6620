"""Swap a model's dropout layers for the fused ones.

torch's ``nn.Dropout`` and ``nn.Dropout1d/2d/3d``, timm's ``DropPath`` and
torchvision's ``StochasticDepth`` in "row" mode become their regdrop_ext
equivalents with the same probability, ``inplace`` flag and training mode.
These layers hold no parameters or buffers, so the state_dict is unchanged.
"""

import copy
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from . import modules
from .dropout_layers import stochastic_depth_class, timm_drop_path_classes

__all__ = ["ConversionSummary", "convert"]

_TORCH_DROPOUT = {
    nn.Dropout: modules.Dropout,
    nn.Dropout1d: modules.Dropout1d,
    nn.Dropout2d: modules.Dropout2d,
    nn.Dropout3d: modules.Dropout3d,
}
_FUSED = (*_TORCH_DROPOUT.values(), modules.DropPath, modules.DropoutAdd, modules.BiasDropoutAdd)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class ConversionSummary:
    """What :func:`convert` did, by qualified module name ("" is the model itself)."""

    replaced: dict[str, tuple[type, type]] = field(default_factory=dict)  # name -> (old type, new type)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was left alone

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)}, left alone {len(self.skipped)}"]
        lines += [
            f"  {name or '<model>'}: {_type_name(old)} -> {_type_name(new)}"
            for name, (old, new) in self.replaced.items()
        ]
        lines += [f"  {name or '<model>'}: left alone, {reason}" for name, reason in self.skipped.items()]
        lines.append(CANNOT_SEE)
        return "\n".join(lines)


CANNOT_SEE = (
    "(layers only: dropout the model calls as a function stays native, and a replaced layer may "
    "never be called; regdrop_ext.trace_random_ops(model, example_input) shows both)"
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


def convert(model: nn.Module, *, inplace: bool = True) -> tuple[nn.Module, ConversionSummary]:
    """Replace the dropout layers of ``model`` with regdrop_ext's fused ones.

    Each replacement keeps its layer's probability, ``inplace`` flag and
    training mode; a layer shared by several parents stays shared. Forward
    hooks registered on a replaced layer are not carried over.

    Args:
        model: the model to convert; it may itself be a dropout layer.
        inplace: change ``model`` itself; ``False`` converts a deep copy and
            leaves ``model`` untouched. Default: ``True``

    Returns:
        ``(converted model, ConversionSummary)``. The converted model is
        ``model`` itself unless ``inplace=False`` or ``model`` is a dropout layer.

    What it cannot know: ``convert`` sees the layers, not the forward. Dropout
    that the model calls as a function stays native: ``F.dropout(x,
    self.drop_rate, self.training)`` in timm's classifier heads,
    ``F.scaled_dot_product_attention(..., dropout_p=...)`` in fused attention
    (timm, Hugging Face, torchvision). A replaced layer may also never be
    called: timm keeps ``attn_drop`` but passes its ``p`` to fused attention.
    The summary counts layers, not random ops. :func:`trace_random_ops` runs
    one forward on an example input and lists the random ops that still run
    natively, and where, and the dropout layers that were never called.

    The converted model compiles with ``torch.jit.script`` wherever the
    original did (``torch.jit.load`` needs ``import regdrop_ext`` first: it
    registers the ops). Scripted, ``inplace=True`` layers compute out of place
    and copy the result back.
    """
    if not inplace:
        model = copy.deepcopy(model)
    summary = ConversionSummary()
    replacements = {}  # old layer -> its replacement

    def visit(name: str, module: nn.Module) -> Optional[nn.Module]:
        if module not in replacements:
            new, reason = _fused(module)
            if new is not None:
                new.train(module.training)
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
            return new, summary
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, new)
    return model, summary
