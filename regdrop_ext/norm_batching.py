"""vmap for the norm ops (dropout + residual + LayerNorm / RMSNorm,
regdrop_ext.norm): a batching rule per op of the manifest's norm family,
with the element family's semantics (regdrop_ext/batching.py):

* the normalized dim is each sample's last dim; a sample's rows, element
  units (row-major over the sample, as the op on it alone numbers them) and
  drop-path units (its dim 0) are those of the op on that sample alone;
* ``randomness="error"`` (vmap's default) refuses a call that draws (p > 0),
  as torch does; a call with p == 0 draws nothing and runs in every mode;
* ``"different"``: each sample its own mask, drawn by ONE call over the
  stacked batch (sample b's units follow sample b - 1's in one stream); the
  mask comes back batched, a row of ceil(units / 8) bytes per sample;
* ``"same"``: every sample the mask of one draw, unbatched;
* an explicit ``seed``: not random; each sample is the op on that sample
  alone with (seed, offset), whatever the mode;
* a random call on tensors vmap does not batch follows the mode, through a
  FuncTorchVmapMode kernel, as the element family's does.

Which calls run as one call over the batch: a row's statistics and values
depend on that row alone, so the batch stacks along the rows, where every
sample shares the parameters (weight, bias, input_bias unbatched) and its
units follow the previous sample's ("different", or p == 0). The others run
the op once per sample: "same" and seeded calls (their samples all draw
units 0 .. U-1, which no shard of one call can repeat), per-sample
parameters, and backward calls that return parameter gradients (each
sample's column sums, in the order the op sums them for that sample alone).
A per-sample run of "different" draws the stream one call would (one draw
from the generator) and gives sample b the shard (b * U, U, U) of it, so it
draws exactly what the stacked call draws.

Backward ops follow their saved state: a batched mask is a row per sample,
an unbatched one every sample's; a batched rng_state a stream per sample,
an unbatched one every sample's. So per-sample gradients (vmap of
torch.func.grad) give each sample the gradients of the op on it alone.
Low-memory ops support "same" and seeds; "different" raises, as an
rng_state cannot say where in one stream a sample's units start.
"""

import torch
from torch import Tensor

from . import manifest
from .batching import _batch_first, _joined, _mode, _rows, _unbatched_random_call

_PARAMETERS = ("weight", "bias", "input_bias")
_WANTED_GRADIENTS = ("weight_grad", "bias_grad", "input_bias_grad")


def _tensor_names(op: manifest.Op):
    return [a.name for a in op.op.default._schema.arguments if str(a.type) in ("Tensor", "Optional[Tensor]")]


def _per_sample_names(op: manifest.Op):
    """The arguments that hold samples (rows); the others are parameters or saved state."""
    if op.is_forward:
        return ("input", "residual")
    return ("grad_output", "grad_residual_out", "residual_out", "mean", "rstd")


def _units(sample_shape, bound) -> int:
    """The units of one sample: none (p == 0), its dim 0 (drop-path) or its elements."""
    if bound["p"] == 0:
        return 0
    if bound.get("drop_path", False):
        return sample_shape[0]
    n = 1
    for size in sample_shape:
        n *= size
    return n


def _stacks(t: Tensor, drop_path: bool) -> Tensor:
    """A batch-first tensor as one call takes it: for drop-path the batch
    merged into the sample dim, so that sample b's units follow b - 1's."""
    return t.flatten(0, 1) if drop_path and t.dim() >= 2 else t


def _batch(bound, dims, names, size):
    """The batch-first tensors of ``names`` (expanded where unbatched); None stays None."""
    return {n: None if bound.get(n) is None else _batch_first(bound[n], dims[n], size) for n in names}


def _stack(results, dims_of_shared):
    """Per-sample results as batched outputs: shared ones (all samples alike) from sample 0."""
    outputs, out_dims = [], []
    for k, first in enumerate(results[0]):
        if first is None:
            outputs.append(None)
            out_dims.append(None)
        elif k in dims_of_shared:
            outputs.append(first)
            out_dims.append(None)
        else:
            outputs.append(torch.stack([r[k] for r in results]))
            out_dims.append(0)
    return tuple(outputs), tuple(out_dims)


def _drawn_stream(bound):
    """(seed, offset): one draw from the call's generator, as one call of any size makes it."""
    one = bound["input"].new_zeros(1, dtype=torch.float32)
    rng_state = torch.ops.regdrop.dropout_add_norm_low_memory(one, None, None, None, bound["p"],
                                                               generator=bound.get("generator"))[2]
    return rng_state.tolist()


# --- forward ops ----------------------------------------------------------------------


def _forward(op, info, bound, dims, size):
    mode = _mode(info, bound.get("seed")) if bound["p"] > 0 else "none"
    if op.variant == "low_memory" and mode == "different":
        raise RuntimeError(
            f"vmap: regdrop.{op.name} (low-memory dropout) does not support randomness='different' (an rng_state "
            "cannot say where in one stream each sample's units start); use the default mask mode, or "
            "randomness='same'"
        )
    samples = _batch(bound, dims, ("input", "residual"), size)
    drop_path = bound.get("drop_path", False)
    shared_parameters = all(dims.get(n) is None for n in _PARAMETERS)
    whole_rows = samples["input"].dim() - 1 >= (2 if drop_path else 1)  # else the op refuses each sample
    if mode in ("different", "none") and shared_parameters and whole_rows:
        return _stacked_forward(op, mode, bound, samples, size, drop_path)
    return _per_sample_forward(op, mode, bound, dims, samples, size)


def _stacked_forward(op, mode, bound, samples, size, drop_path):
    x = samples["input"]
    call = dict(bound, **{n: None if t is None else _stacks(t, drop_path) for n, t in samples.items()})
    output, residual_out, mask, mean, rstd = op.call(call)
    rows = x.shape[:-1]
    outputs = [output.view(x.shape), residual_out.view(x.shape), mask, mean.view(rows), rstd.view(rows)]
    if mode == "different":
        outputs[2] = _rows(mask, size, _units(x.shape[1:], bound))
        return tuple(outputs), (0, 0, 0, 0, 0)
    return tuple(outputs), (0, 0, None, 0, 0)


def _per_sample_forward(op, mode, bound, dims, samples, size):
    parameters = _batch(bound, dims, [n for n in _PARAMETERS if dims.get(n) is not None], size)
    stream = {}
    if mode != "none":
        seed, offset = (bound["seed"], bound["offset"]) if bound.get("seed") is not None else _drawn_stream(bound)
        stream = {"generator": None, "seed": seed, "offset": offset}
    units = _units(samples["input"].shape[1:], bound)
    results = []
    for b in range(size):
        call = dict(bound, **stream)
        call.update({n: None if t is None else t[b] for n, t in {**samples, **parameters}.items()})
        if mode == "different":
            run = max(units, 1)
            call["shard"] = [b * units, run, run]
        results.append(op.call(call))
    return _stack(results, () if mode == "different" else (2,))


# --- backward ops ---------------------------------------------------------------------


def _backward(op, bound, dims, size):
    state = "rng_state" if op.variant == "low_memory_backward" else "mask"
    samples = _batch(bound, dims, _per_sample_names(op), size)
    drop_path = bound.get("drop_path", False)
    grad = samples["grad_output"]
    stacked = (
        not any(bound.get(n) is not None for n in _WANTED_GRADIENTS)  # column sums are per sample
        and dims.get("weight") is None
        and (state == "mask" or bound["p"] == 0)  # a shared stream: every sample draws units 0 .. U-1
        and grad.dim() - 1 >= (2 if drop_path else 1)
    )
    if stacked:
        call = dict(bound, **{n: None if t is None else _stacks(t, drop_path) for n, t in samples.items()})
        if bound["p"] > 0:
            rows = _batch_first(bound["mask"], dims["mask"], size)
            call["mask"] = _joined(rows, _units(grad.shape[1:], bound))
        # grad_input and grad_residual (or None); no parameter gradient was asked for
        outputs = tuple(None if t is None else t.view(grad.shape) for t in op.call(call))
        return outputs, tuple(None if t is None else 0 for t in outputs)
    saved = bound[state]
    states = saved if dims[state] is None else saved.movedim(dims[state], 0)
    weights = None if dims.get("weight") is None else bound["weight"].movedim(dims["weight"], 0)
    results = []
    for b in range(size):
        call = dict(bound, **{n: None if t is None else t[b] for n, t in samples.items()})
        call[state] = states if dims[state] is None else states[b].contiguous()  # as the op reads it
        if weights is not None:
            call["weight"] = weights[b]
        results.append(op.call(call))
    return _stack(results, ())


def _rule(op: manifest.Op):
    """The batching rule of ``op``: the arguments bound by name, then its direction's rule."""
    names = [a.name for a in op.op.default._schema.arguments]
    tensors = _tensor_names(op)

    def rule(info, in_dims, *args, **kwargs):
        bound = op.bind(args, kwargs)
        dims = {n: (in_dims[k] if k < len(in_dims) else None) for k, n in enumerate(names)}
        if bound.get("shard") is not None:
            raise RuntimeError(
                f"vmap: regdrop.{op.name} does not batch a shard of a larger call (shard={list(bound['shard'])}); "
                "call it per sample, or on the whole tensor"
            )
        bound.pop("shard", None)
        size = next(bound[n].size(dims[n]) for n in tensors if dims.get(n) is not None)
        if op.is_forward:
            return _forward(op, info, bound, dims, size)
        return _backward(op, bound, dims, size)

    return rule


def _unbatched_call(op: manifest.Op, rule):
    """The FuncTorchVmapMode kernel of forward op ``op``: a call that draws
    (p > 0) follows the randomness mode as the element family's random ops
    do (batching._unbatched_random_call); one with p == 0 is no random call
    and passes on."""
    random_call = _unbatched_random_call(op, rule)
    vmap_mode = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)

    def kernel(*args, **kwargs):
        if op.bind(args, kwargs)["p"] > 0:
            return random_call(*args, **kwargs)
        with torch._C._ExcludeDispatchKeyGuard(vmap_mode):
            return op.op(*args, **kwargs)

    return kernel


_library = None  # keeps the FuncTorchVmapMode registrations alive


def register() -> None:
    """Registers a rule for every op of the manifest's norm family (called once, at import)."""
    global _library
    _library = torch.library.Library("regdrop", "IMPL")
    for op in manifest.ops(family="norm"):
        rule = _rule(op)
        torch.library.register_vmap(f"regdrop::{op.name}", rule)
        if op.is_forward:
            _library.impl(op.name, _unbatched_call(op, rule), "FuncTorchVmapMode")
