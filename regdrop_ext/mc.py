"""Monte Carlo dropout: predictions with the dropout layers left on.

``mc_dropout`` puts only the dropout layers of a model in training mode;
``mc_predict`` runs many stochastic forwards as a few large batches and
returns their mean and spread.
"""

import contextlib
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import modules
from .convert import stochastic_depth_class, timm_drop_path_classes

__all__ = ["MCPrediction", "is_dropout_layer", "mc_dropout", "mc_predict"]

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


def is_dropout_layer(module: nn.Module) -> bool:
    """True for torch's, regdrop_ext's, timm's and torchvision's dropout and drop-path layers."""
    third_party = (*timm_drop_path_classes(), stochastic_depth_class())
    return isinstance(module, _DROPOUT_LAYERS + tuple(cls for cls in third_party if cls is not None))


@contextlib.contextmanager
def mc_dropout(model: nn.Module):
    """Within the block, the dropout layers of ``model`` are in training mode
    and every other module (BatchNorm included) in eval mode. On exit every
    module gets its previous mode back, also when the block raised."""
    previous = {module: module.training for module in model.modules()}
    try:
        for module in previous:
            module.training = is_dropout_layer(module)
        yield model
    finally:
        for module, training in previous.items():
            module.training = training


class MCPrediction(NamedTuple):
    """Mean and standard deviation over the Monte Carlo samples; with
    ``reduce="softmax"`` they are those of the probabilities, and ``entropy``
    is the entropy (in nats) of the mean probability vector."""

    mean: Tensor
    std: Tensor
    entropy: Optional[Tensor] = None


@contextlib.contextmanager
def _default_generators_seeded_from(generator: Optional[torch.Generator], device: torch.device):
    """Seed the default CPU generator (and ``device``'s, if CUDA) from ``generator``,
    restoring their states on exit; without a generator, do nothing."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(2**63 - 1, (), generator=generator, device=generator.device))
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def mc_predict(
    model: nn.Module,
    x: Tensor,
    samples: int = 100,
    *,
    batch_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    reduce: Optional[str] = None,
) -> MCPrediction:
    """Monte Carlo dropout prediction: ``samples`` forwards of ``x`` with only
    the dropout layers on (see :func:`mc_dropout`), under ``torch.no_grad()``.

    The samples are run as a few large batches: ``x`` repeated along dim 0,
    as many copies per forward as fit in ``batch_size`` rows (at least one).
    Rows must not interact, which holds for every layer once BatchNorm is in
    eval mode, except torchvision's StochasticDepth in "batch" mode.

    Args:
        model: maps a batch ``x`` of N rows to an output of N rows.
        x: the inputs, N rows along dim 0.
        samples: number of stochastic forwards, at least 2. Default: 100
        batch_size: most rows per forward. Default: all samples in one forward
        generator: makes the prediction reproducible. Every random draw of the
            forwards (regdrop_ext's, torch's, timm's) comes from the default
            generators of the CPU and of ``x``'s CUDA device; they are seeded
            from ``generator`` for the call and get their states back after.
            Without it they are used and advanced as usual.
        reduce: ``None`` for the raw outputs, or ``"softmax"``: softmax over the
            last dim, then mean, std and predictive entropy of the probabilities.
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples}")
    if reduce not in (None, "softmax"):
        raise ValueError(f"reduce must be None or 'softmax', got {reduce!r}")
    rows = x.size(0)
    per_forward = samples if batch_size is None else max(1, batch_size // rows)
    draws = []
    with torch.no_grad(), mc_dropout(model), _default_generators_seeded_from(generator, x.device):
        for start in range(0, samples, per_forward):
            copies = min(per_forward, samples - start)
            out = model(x.expand(copies, *x.shape).flatten(0, 1))
            draws.append(out.unflatten(0, (copies, rows)))
    draws = torch.cat(draws)
    if reduce is None:
        return MCPrediction(draws.mean(0), draws.std(0))
    probabilities = draws.softmax(-1)
    mean = probabilities.mean(0)
    return MCPrediction(mean, probabilities.std(0), torch.special.entr(mean).sum(-1))
