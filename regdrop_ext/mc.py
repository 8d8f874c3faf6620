"""Monte Carlo dropout: predictions with the dropout layers left on.

``mc_dropout`` puts only the dropout layers of a model in training mode;
``mc_predict`` runs many stochastic forwards as a few large batches and
returns their mean and spread.

Dropout that a model calls as a function follows the training flag of the
module that calls it, which is not a dropout layer and stays in eval mode:
``F.dropout(x, self.drop_rate, self.training)`` in a classifier head,
``dropout_p=p if self.training else 0.0`` in fused attention (timm, Hugging
Face, torchvision). Monte Carlo dropout cannot reach it, converted model or
not (``convert(..., functional=True)`` draws it with regdrop_ext's ops when
it runs, but its training flag is off); ``mc_unreachable_random_calls`` finds
it and ``mc_predict`` warns.
"""

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn
from .dropout_layers import is_dropout_layer, modes, training_but_statistics
from .routing import is_routing_hook
from .trace import RandomCall, trace_random_ops

__all__ = ["MCPrediction", "mc_dropout", "mc_predict", "mc_unreachable_random_calls"]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def mc_dropout(model: nn.Module):
    """Within the block, the dropout layers of ``model`` are in training mode
    and every other module (BatchNorm included) in eval mode. On exit every
    module gets its previous mode back, also when the block raised.

    Random ops that follow another module's training flag stay off: see
    :func:`mc_unreachable_random_calls`."""
    return modes(model, is_dropout_layer)


@contextlib.contextmanager
def _user_hooks_suspended(model: nn.Module):
    """The model's own hooks (not regdrop_ext's routing) set aside: a check
    that runs the model must not show its forwards to them."""
    saved = {}
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name)
            if hooks:
                saved[module, name] = hooks
                setattr(module, name, type(hooks)((key, hook) for key, hook in hooks.items() if is_routing_hook(hook)))
    try:
        yield
    finally:
        for (module, name), hooks in saved.items():
            setattr(module, name, hooks)


def mc_unreachable_random_calls(model: nn.Module, *args, **kwargs) -> list[RandomCall]:
    """The random ops of a training-mode forward of ``model`` on the example
    inputs that do not run under :func:`mc_dropout`: randomness that Monte
    Carlo predictions leave out. Typically functional dropout in a module
    that is not a dropout layer; fix it in the model (a dropout layer instead
    of the call), or put that module in training mode too if nothing else in
    it depends on the mode.

    Runs two forwards through :func:`trace_random_ops` (no gradients; the
    model's state and the random generators are left as they were). In the
    "training-mode" one, normalization layers with running statistics
    (BatchNorm, InstanceNorm) stay in eval mode, and the model's own hooks see
    neither forward."""
    with _user_hooks_suspended(model):
        with training_but_statistics(model):
            training = trace_random_ops(model, *args, **kwargs)
        with mc_dropout(model):
            reached = {(c.module, c.function, c.op) for c in trace_random_ops(model, *args, **kwargs).calls}
    return [call for call in training.calls if (call.module, call.function, call.op) not in reached]


def _warn_about_unreachable_random_calls(model: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        missed = mc_unreachable_random_calls(model, *args, **kwargs)
    except Exception as error:  # a model that cannot run in training mode on its inputs alone
        warnings.warn(
            "mc_predict could not check for random ops that Monte Carlo dropout cannot reach: "
            f"a traced forward of two copies of the inputs raised {type(error).__name__}: {error} "
            "(check=False skips the check)",
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
    """Mean and standard deviation over the Monte Carlo samples, shaped as the
    selected output (a tensor, or a tuple, dict or ModelOutput of them); with
    ``reduce="softmax"`` they are those of the probabilities, and ``entropy``
    is the entropy (in nats) of the mean probability vector."""

    mean: Any
    std: Any
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


def _map_tensors(function: Callable[[Tensor, str], Any], value: Any, path: str = "output") -> Any:
    """``value`` with each tensor ``t`` at ``path`` replaced by ``function(t, path)``:
    through tuples (named too), lists, dicts (Hugging Face's ModelOutput too)
    and dataclasses; anything else is kept."""
    if isinstance(value, Tensor):
        return function(value, path)
    if isinstance(value, dict):
        mapped = {key: _map_tensors(function, item, f"{path}[{key!r}]") for key, item in value.items()}
        return type(value)(**mapped) if dataclasses.is_dataclass(value) else type(value)(mapped)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _map_tensors(function, getattr(value, f.name), f"{path}.{f.name}") for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    if isinstance(value, (tuple, list)):
        items = [_map_tensors(function, item, f"{path}[{i}]") for i, item in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _tensors_in(value: Any) -> list[Tensor]:
    found = []
    _map_tensors(lambda t, path: found.append(t), value)
    return found


def _select(output: Any, selector: Union[None, str, Callable[[Any], Any]]) -> Any:
    if selector is None:
        return output
    if callable(selector):
        return selector(output)
    if isinstance(output, dict) and selector in output:
        return output[selector]
    if not hasattr(output, selector):
        raise AttributeError(f"mc_predict: output={selector!r}, but the model's output ({type(output).__name__}) has no such attribute")
    return getattr(output, selector)


def mc_predict(
    model: nn.Module,
    x: Optional[Tensor] = None,
    samples: int = 100,
    *,
    model_kwargs: Optional[dict[str, Any]] = None,
    output: Union[None, str, Callable[[Any], Any]] = None,
    batch_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    reduce: Optional[str] = None,
    check: bool = True,
) -> MCPrediction:
    """Monte Carlo dropout prediction: ``samples`` forwards of the inputs with
    only the dropout layers on (see :func:`mc_dropout`), under ``torch.no_grad()``.

    The samples are run as a few large batches: every input tensor repeated
    along dim 0, as many copies per forward as fit in ``batch_size`` rows (at
    least one). Rows must not interact, which holds for every layer once
    BatchNorm is in eval mode, except torchvision's StochasticDepth in
    "batch" mode.

    First, unless ``check=False``, it warns if the model has random ops that
    Monte Carlo dropout cannot reach (:func:`mc_unreachable_random_calls`: two
    extra forwards of two copies of the inputs, without gradients, BatchNorm
    kept in eval mode, hidden from the model's hooks, leaving the model's
    state and the random generators as they were).

    Args:
        model: maps inputs of N rows to outputs of N rows.
        x: the positional input, N rows along dim 0; may be None when
            ``model_kwargs`` holds the inputs.
        samples: number of stochastic forwards, at least 2. Default: 100
        model_kwargs: keyword inputs (``attention_mask=...``). Tensors with N
            rows along dim 0 are repeated with ``x``; other values are passed
            as they are.
        output: what to average: ``None`` for the model's output itself, the
            name of an attribute or key (``"logits"``), or a callable taking
            the output. Tensors of N rows in it are averaged over the samples,
            through tuples, lists, dicts and dataclasses (Hugging Face's
            ``ModelOutput``), which ``mean`` and ``std`` then mirror.
        batch_size: most rows per forward. Default: all samples in one forward
        generator: makes the prediction reproducible. Every random draw of the
            forwards (regdrop_ext's, torch's, timm's) comes from the default
            generators of the CPU and of the inputs' CUDA device; they are
            seeded from ``generator`` for the call and get their states back
            after. Without it they are used and advanced as usual.
        reduce: ``None`` for the raw outputs, or ``"softmax"``: softmax over the
            last dim, then mean, std and predictive entropy of the
            probabilities (the selected output must be one tensor).
        check: look for random ops that Monte Carlo dropout cannot reach and
            warn about them. Default: ``True``
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mc_predict: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"mc_predict: samples must be an int, got {type(samples).__name__}")
    if samples < 2:
        raise ValueError(f"mc_predict: samples must be at least 2, got {samples}")
    if reduce not in (None, "softmax"):
        raise ValueError(f"mc_predict: reduce must be None or 'softmax', got {reduce!r}")
    if output is not None and not isinstance(output, str) and not callable(output):
        raise TypeError(f"mc_predict: output must be None, an attribute name or a callable, got {type(output).__name__}")
    if x is not None and not isinstance(x, Tensor):
        raise TypeError(f"mc_predict: x must be a Tensor or None, got {type(x).__name__}")
    model_kwargs = dict(model_kwargs or {})
    first = x if x is not None else next((v for v in model_kwargs.values() if isinstance(v, Tensor)), None)
    if first is None or first.dim() == 0:
        raise ValueError("mc_predict: no input tensor with rows along dim 0: pass x or tensors in model_kwargs")
    rows = first.size(0)
    for name, value in model_kwargs.items():
        if isinstance(value, Tensor) and (value.dim() == 0 or value.size(0) != rows):
            raise ValueError(f"mc_predict: model_kwargs[{name!r}] has shape {tuple(value.shape)}, not {rows} rows along dim 0")

    def inputs(copies: int) -> tuple[tuple, dict]:
        args = () if x is None else (_copies(x, copies),)
        return args, {k: _copies(v, copies) if isinstance(v, Tensor) else v for k, v in model_kwargs.items()}

    if check:
        _warn_about_unreachable_random_calls(model, *inputs(2))
    per_forward = samples if batch_size is None else max(1, batch_size // rows)
    draws = []

    def split(copies: int):
        def by_copy(tensor: Tensor, path: str) -> Tensor:
            if tensor.dim() == 0 or tensor.size(0) != copies * rows:
                raise ValueError(
                    f"mc_predict: {path} has shape {tuple(tensor.shape)}, not {copies} x {rows} rows along dim 0 "
                    "(select the per-row outputs with output=)"
                )
            return tensor.unflatten(0, (copies, rows))

        return by_copy

    with torch.no_grad(), mc_dropout(model), _default_generators_seeded_from(generator, first.device):
        for start in range(0, samples, per_forward):
            copies = min(per_forward, samples - start)
            args, kwargs = inputs(copies)
            draws.append(_map_tensors(split(copies), _select(model(*args, **kwargs), output)))
    if not _tensors_in(draws[0]):
        raise ValueError(f"mc_predict: the selected output ({type(draws[0]).__name__}) holds no tensor")
    stacked = iter([torch.cat(parts) for parts in zip(*(_tensors_in(draw) for draw in draws))])
    samples_out = _map_tensors(lambda tensor, path: next(stacked), draws[0])
    if reduce is None:
        return MCPrediction(_map_tensors(lambda t, p: t.mean(0), samples_out), _map_tensors(lambda t, p: t.std(0), samples_out))
    if not isinstance(samples_out, Tensor):
        raise ValueError(f"mc_predict: reduce='softmax' needs one tensor; the output is a {type(samples_out).__name__} (select one with output=)")
    probabilities = samples_out.softmax(-1)
    mean = probabilities.mean(0)
    return MCPrediction(mean, probabilities.std(0), torch.special.entr(mean).sum(-1))
