"""Monte Carlo dropout: predictions with the dropout layers left on.

``mc_dropout`` puts only the dropout layers of a model in training mode;
``mc_predict`` runs many stochastic forwards as a few large batches and
returns their mean and spread.

Dropout that a model calls as a function follows the training flag of the
module that calls it, which is not a dropout layer and stays in eval mode:
``F.dropout(x, self.drop_rate, self.training)`` in a classifier head,
``dropout_p=p if self.training else 0.0`` in fused attention (timm, Hugging
Face, torchvision). Monte Carlo dropout cannot reach it, converted model or
not; ``mc_unreachable_random_calls`` finds it and ``mc_predict`` warns.
"""

import contextlib
import warnings
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .dropout_layers import is_dropout_layer
from .trace import RandomCall, trace_random_ops

__all__ = ["MCPrediction", "mc_dropout", "mc_predict", "mc_unreachable_random_calls"]


@contextlib.contextmanager
def _modes(model: nn.Module, training: Callable[[nn.Module], bool]):
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


def mc_dropout(model: nn.Module):
    """Within the block, the dropout layers of ``model`` are in training mode
    and every other module (BatchNorm included) in eval mode. On exit every
    module gets its previous mode back, also when the block raised.

    Random ops that follow another module's training flag stay off: see
    :func:`mc_unreachable_random_calls`."""
    return _modes(model, is_dropout_layer)


def mc_unreachable_random_calls(model: nn.Module, *args, **kwargs) -> list[RandomCall]:
    """The random ops of a training-mode forward of ``model`` on the example
    inputs that do not run under :func:`mc_dropout`: randomness that Monte
    Carlo predictions leave out. Typically functional dropout in a module
    that is not a dropout layer; fix it in the model (a dropout layer instead
    of the call), or put that module in training mode too if nothing else in
    it depends on the mode.

    Runs two forwards through :func:`trace_random_ops` (no gradients; the
    model's state and the random generators are left as they were)."""
    with _modes(model, lambda module: True):
        training = trace_random_ops(model, *args, **kwargs)
    with mc_dropout(model):
        reached = {(call.module, call.function, call.op) for call in trace_random_ops(model, *args, **kwargs).calls}
    return [call for call in training.calls if (call.module, call.function, call.op) not in reached]


def _warn_about_unreachable_random_calls(model: nn.Module, batch: Tensor) -> None:
    try:
        missed = mc_unreachable_random_calls(model, batch)
    except Exception as error:  # a model that cannot run in training mode on its inputs alone
        warnings.warn(
            "mc_predict could not check for random ops that Monte Carlo dropout cannot reach: "
            f"a traced forward of two copies of x raised {type(error).__name__}: {error}",
            stacklevel=3,
        )
        return
    if missed:
        warnings.warn(
            f"mc_predict: {sum(call.count for call in missed)} random ops of a training-mode forward do not "
            "run under mc_dropout, which switches on only the dropout layers; the prediction leaves "
            "their randomness out (see regdrop_ext.mc_unreachable_random_calls):\n"
            + "\n".join(f"  {call}" for call in missed),
            stacklevel=3,
        )


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


def _copies(x: Tensor, copies: int) -> Tensor:
    """``copies`` copies of ``x`` along dim 0, always in new memory: the model
    may drop out in place, and must never write into the caller's ``x``."""
    return x.repeat(copies, *([1] * (x.dim() - 1)))


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

    First it warns if the model has random ops that Monte Carlo dropout cannot
    reach (:func:`mc_unreachable_random_calls`, two extra forwards of two
    copies of ``x``, without gradients, leaving the model's state and the
    random generators as they were).

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
    _warn_about_unreachable_random_calls(model, _copies(x, 2))
    rows = x.size(0)
    per_forward = samples if batch_size is None else max(1, batch_size // rows)
    draws = []
    with torch.no_grad(), mc_dropout(model), _default_generators_seeded_from(generator, x.device):
        for start in range(0, samples, per_forward):
            copies = min(per_forward, samples - start)
            out = model(_copies(x, copies))
            draws.append(out.unflatten(0, (copies, rows)))
    draws = torch.cat(draws)
    if reduce is None:
        return MCPrediction(draws.mean(0), draws.std(0))
    probabilities = draws.softmax(-1)
    mean = probabilities.mean(0)
    return MCPrediction(mean, probabilities.std(0), torch.special.entr(mean).sum(-1))
