"""What counts as a dropout layer: torch's, regdrop_ext's, timm's DropPath and
torchvision's StochasticDepth. ``convert`` replaces some of them, ``mc_dropout``
switches them on, and ``trace_random_ops`` lists those that a forward never calls.
"""

import contextlib
import sys
from typing import Callable, Optional

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from . import modules

__all__ = [
    "dropout_probability",
    "is_dropout_layer",
    "modes",
    "stochastic_depth_class",
    "timm_drop_path_classes",
    "training_but_statistics",
]

_DROPOUT_LAYERS = (
    nn.Dropout,  # also regdrop_ext's Dropout, which subclass torch's
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    modules.DropPath,  # also DropPathAdd
    modules.DropoutAdd,
    modules.BiasDropoutAdd,
)


def _loaded_class(module_name: str, class_name: str) -> Optional[type]:
    """A class of a module that is already imported, else None. A model that
    holds a timm or torchvision layer has imported its module, so there is
    nothing to import here, and nothing is imported where they are absent."""
    return getattr(sys.modules.get(module_name), class_name, None)


def timm_drop_path_classes() -> set[type]:
    """timm's DropPath: ``timm.layers`` and its older home ``timm.models.layers``
    (an alias of the same class in recent timm, a class of its own before)."""
    found = (_loaded_class("timm.layers", "DropPath"), _loaded_class("timm.models.layers", "DropPath"))
    return {cls for cls in found if cls is not None}


def stochastic_depth_class() -> Optional[type]:
    """torchvision's StochasticDepth, if torchvision.ops is imported."""
    return _loaded_class("torchvision.ops", "StochasticDepth")


def is_dropout_layer(module: nn.Module) -> bool:
    """True for torch's, regdrop_ext's, timm's and torchvision's dropout and drop-path layers."""
    third_party = (*timm_drop_path_classes(), stochastic_depth_class())
    return isinstance(module, _DROPOUT_LAYERS + tuple(cls for cls in third_party if cls is not None))


def dropout_probability(layer: nn.Module) -> Optional[float]:
    """A dropout layer's probability (``p``, or ``drop_prob`` for drop-path), None if it has neither."""
    for name in ("p", "drop_prob"):
        if isinstance(getattr(layer, name, None), (int, float)):
            return float(getattr(layer, name))
    return None


@contextlib.contextmanager
def modes(model: nn.Module, training: Callable[[nn.Module], bool]):
    """Each module of ``model`` in training mode where ``training(module)``;
    every module gets its previous mode back on exit, also after an exception."""
    previous = {module: module.training for module in model.modules()}
    try:
        for module in previous:
            module.training = training(module)
        yield model
    finally:
        for module, mode in previous.items():
            module.training = mode


def training_but_statistics(model: nn.Module):
    """:func:`modes` for a training-mode trace: every module in training mode
    except the normalization layers with running statistics (BatchNorm,
    InstanceNorm), which would normalize with batch statistics instead (and
    refuse a batch of one). Random ops do not depend on their mode."""
    return modes(model, lambda module: not isinstance(module, _NormBase))
