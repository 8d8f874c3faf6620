"""vmap for the regdrop ops (torch.func.vmap): a batching rule per op.

A vmapped call runs as ONE call of an op on the whole batch, laid out so
that the units it draws (or reads) are the ones the per-sample calls would:

* ``randomness="different"``: the batch goes first, so sample b's units
  follow sample b - 1's in one stream; each sample gets its own mask.
* ``randomness="same"``: the batch goes inside each unit, so every sample
  shares one mask: an element of the batch becomes a row of drop-path (one
  unit per row, with dropout's scale), a channel or a sample keeps its unit
  with the batch inside it.
* ``randomness="error"`` (vmap's default) refuses a random op, as torch does.
* A call with an explicit ``seed`` is not random: every sample draws the
  stream (seed, offset), so they all share its mask, whatever the mode, and
  each sample's result is the op's on that sample alone.
* A random op on tensors vmap does not batch still follows the mode, through
  a kernel on the FuncTorchVmapMode key (as torch's random ops do): "error"
  raises, "same" draws once, "different" draws per sample (in-place ops on
  an unbatched tensor refuse "different", as torch's do).

Under vmap an element mask follows each sample's memory order, as the op's
on that sample alone would (row-major where a sample is not dense), and
the masks of "different" are batched along dim 0, one row of
ceil(units / 8) bytes per sample. Backward ops follow their mask: a batched
mask reads the batch first, an unbatched one inside each unit. So
per-sample gradients (vmap of torch.func.grad) work. Low-memory ops support
"same" and explicit seeds; "different" raises, as an rng_state cannot say
where in one stream a sample's units start.
"""

import math

import torch
from torch import Tensor

ops = torch.ops.regdrop

RANDOMNESS_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use the 'same' or "
    "'different' randomness flags on vmap or perform the randomness operation out of vmap"
)


# --- batches and masks ------------------------------------------------------------


def _batch_size(tensors, in_dims) -> int:
    return next(t.size(d) for t, d in zip(tensors, in_dims) if t is not None and d is not None)


def _batch_first(t: Tensor, dim, size: int) -> Tensor:
    """``t`` with its batch dimension first (expanded if it has none)."""
    return t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _mode(info, seed) -> str:
    if seed is not None:
        return "same"
    if info.randomness == "error":
        raise RuntimeError(RANDOMNESS_ERROR)
    return info.randomness


def _unpack(mask: Tensor, bits: int) -> Tensor:
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :bits]


def _pack(bits: Tensor) -> Tensor:
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, (-bits.size(-1)) % 8)).unflatten(-1, (-1, 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], device=bits.device, dtype=torch.uint8)
    return (padded * weights).sum(-1, dtype=torch.uint8)


def _rows(mask: Tensor, batch: int, units: int) -> Tensor:
    """The mask of one call over batch x units units, as a row per sample."""
    if units % 8 == 0:
        return mask.view(batch, units // 8)
    return _pack(_unpack(mask, batch * units).view(batch, units))


def _joined(rows: Tensor, units: int) -> Tensor:
    """A row of mask bytes per sample, as the mask of one call over them all."""
    if units % 8 == 0:
        return rows.reshape(-1)
    return _pack(_unpack(rows, units).reshape(-1))


# --- where the batch goes, per kind of unit -------------------------------------------


def _memory_order(t: Tensor):
    """The dims of ``t``'s samples (dims 1..) in their memory order, outermost
    first, where the samples' elements do not overlap: the order the op walks
    a dense sample in. Samples of interleaved batches (a "same" output's, and
    gradients laid out like it) keep that order though gaps separate their
    elements. Overlapping samples are walked in order (as contiguous copies)."""
    dims = list(range(1, t.dim()))
    by_stride = sorted((d for d in dims if t.size(d) > 1), key=t.stride)
    span = 1
    for d in by_stride:
        if t.stride(d) < span:
            return dims  # elements overlap
        span = t.stride(d) * t.size(d)
    return sorted(dims, key=lambda d: (-t.stride(d), -t.size(d)))


class _Elements:
    """Each element is a unit, numbered in its sample's memory order (in
    row-major order for ``rows``: bias_dropout_add walks rows, contiguous);
    "same" makes each element a row of the batch."""

    def __init__(self, rows: bool = False) -> None:
        self.rows = rows

    def order(self, t: Tensor):
        return list(range(1, t.dim())) if self.rows else _memory_order(t)

    @staticmethod
    def count(shape) -> int:
        return math.prod(shape[1:])

    def lay(self, t: Tensor, mode: str) -> Tensor:
        ordered = t.permute(0, *self.order(t))
        return ordered.contiguous() if mode == "different" else ordered.movedim(0, -1).reshape(-1, t.size(0))

    def back(self, out: Tensor, mode: str, like: Tensor) -> Tensor:
        order = [0, *self.order(like)]
        shape = [like.size(d) for d in order]
        ordered = out.view(shape) if mode == "different" else out.view(*shape[1:], shape[0]).movedim(-1, 0)
        return ordered.permute(sorted(range(len(order)), key=order.__getitem__))


class _Samples:
    """Drop-path: a sample (N, *R) has N units."""

    @staticmethod
    def count(shape) -> int:
        return shape[1]

    @staticmethod
    def lay(t: Tensor, mode: str) -> Tensor:
        return t.flatten(0, 1) if mode == "different" else t.movedim(0, 1).contiguous()

    @staticmethod
    def back(out: Tensor, mode: str, like: Tensor) -> Tensor:
        return out.view(like.shape) if mode == "different" else out.movedim(1, 0)


class _Channels:
    """Channel dropout: a sample (N, C, *S) has N * C units."""

    @staticmethod
    def count(shape) -> int:
        return shape[1] * shape[2]

    @staticmethod
    def lay(t: Tensor, mode: str) -> Tensor:
        return t.flatten(0, 1) if mode == "different" else t.movedim(0, 2).contiguous()

    @staticmethod
    def back(out: Tensor, mode: str, like: Tensor) -> Tensor:
        return out.view(like.shape) if mode == "different" else out.movedim(2, 0)


# --- rules -----------------------------------------------------------------------


def _forward(units, mode, tensors, in_dims, call):
    """call(*laid_out_tensors) -> (output, mask), once over the batch."""
    size = _batch_size(tensors, in_dims)
    batched = [_batch_first(t, d, size) for t, d in zip(tensors, in_dims)]
    out, mask = call(*(units.lay(t, mode) for t in batched))
    out = units.back(out, mode, batched[0])
    if mode == "same":
        return (out, mask), (0, None)
    return (out, _rows(mask, size, units.count(batched[0].shape))), (0, 0)


def _inplace(units, mode, x, dim, call_inplace, call):
    """In place on the batch: the in-place op where the layout is a view of
    the batch's own memory, else the op and a copy back."""
    batched = x.movedim(dim, 0)
    laid = units.lay(batched, mode)
    if mode == "different" and batched.is_contiguous() and laid.data_ptr() == batched.data_ptr():
        mask = call_inplace(laid)  # laid views batched's memory, in its order
    else:
        out, mask = call(laid)
        batched.copy_(units.back(out, mode, batched))
    if mode == "same":
        return mask, None
    return _rows(mask, batched.size(0), units.count(batched.shape)), 0


def _backward(units, tensors, in_dims, call, same_call):
    """call(grad, mask) over the batch: a batched mask reads the batch
    first, an unbatched one (the "same" masks) inside each unit."""
    grad, mask = tensors
    size = _batch_size(tensors, in_dims)
    g = _batch_first(grad, in_dims[0], size)
    if in_dims[1] is None:
        return units.back(same_call(units.lay(g, "same"), mask), "same", g), 0
    rows = _batch_first(mask, in_dims[1], size)
    joined = _joined(rows, units.count(g.shape))
    return units.back(call(units.lay(g, "different"), joined), "different", g), 0


def _low_memory_stream(x: Tensor, p, generator, seed, offset):
    """(seed, offset) and the rng_state tensor of a low-memory call with
    "same": drawn from the generator by a one-element call, or given."""
    if seed is None:
        _, rng_state = ops.dropout_low_memory(x.new_empty(1), p, generator)
        seed, offset = rng_state.tolist()
        return seed, offset, rng_state
    return seed, offset, torch.tensor([seed, offset], dtype=torch.int64, device=x.device)


def _refuse_low_memory_different(mode):
    if mode == "different":
        raise RuntimeError(
            "vmap: low-memory dropout does not support randomness='different' (an rng_state cannot say where "
            "in one stream each sample's units start); use the default mask mode, or randomness='same'"
        )


_RULES = {}  # op name -> its batching rule
_RANDOM_OPS = ("dropout", "dropout_add", "bias_dropout_add", "drop_path", "drop_path_add", "channel_dropout",
               "dropout_", "channel_dropout_", "dropout_low_memory", "dropout_add_low_memory")
_INPLACE_DIFFERENT_ERROR = (
    "vmap: Cannot ask for different inplace randomness on an unbatched tensor. This will appear like same "
    "randomness. If this is necessary for your usage, please file an issue with functorch."
)


class _Info:
    randomness = "different"


def _unbatched_random_call(name: str):
    """The FuncTorchVmapMode kernel of random op ``name``: it runs first for
    every call under vmap. With a batched tensor or a seed it passes the
    call on (to the batching rule, or as a deterministic call); on tensors
    vmap does not batch it applies the randomness mode, as torch's random ops
    do: "error" raises, "same" draws once for all, "different" draws per
    sample (the rule, over the tensors expanded to the batch)."""
    op = getattr(ops, name)
    vmap_mode = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)

    def kernel(*args, **kwargs):
        interpreter = torch._functorch.pyfunctorch.retrieve_current_functorch_interpreter()
        tensors = [a for a in args if isinstance(a, Tensor)]
        with torch._C._ExcludeDispatchKeyGuard(vmap_mode):
            if kwargs.get("seed") is not None or any(torch._C._functorch.is_batchedtensor(t) for t in tensors):
                return op(*args, **kwargs)
            mode = interpreter.randomness()
            if mode == "error":
                raise RuntimeError(RANDOMNESS_ERROR)
            if mode == "same":
                return op(*args, **kwargs)
            if name.endswith("_"):
                raise RuntimeError(_INPLACE_DIFFERENT_ERROR)
            size, level = interpreter.batch_size(), interpreter.level()
            expanded = [a.unsqueeze(0).expand(size, *a.shape) if isinstance(a, Tensor) else a for a in args]
            in_dims = tuple(0 if isinstance(a, Tensor) else None for a in args)
            outputs, out_dims = _RULES[name](_Info(), in_dims, *expanded, **kwargs)
            return tuple(o if d is None else torch._C._functorch._add_batch_dim(o, d, level)
                         for o, d in zip(outputs, out_dims))

    return kernel


_library = None  # keeps the FuncTorchVmapMode registrations alive


def register() -> None:
    """Registers every rule (called once, at import)."""
    global _library
    E, S, C, Rows = _Elements(), _Samples, _Channels, _Elements(rows=True)

    def rule(name):
        def decorate(fn):
            def checked(info, in_dims, *args, shard=None, **kwargs):
                if shard is not None:
                    raise RuntimeError(
                        f"vmap: regdrop.{name} does not batch a shard of a larger call (shard={list(shard)}); "
                        "call it per sample, or on the whole tensor"
                    )
                return fn(info, in_dims, *args, **kwargs)

            _RULES[name] = checked
            return torch.library.register_vmap(f"regdrop::{name}", checked)

        return decorate

    @rule("dropout")
    def _(info, in_dims, x, p, generator=None, *, seed=None, offset=0):
        mode = _mode(info, seed)
        return _forward(E, mode, (x,), in_dims[:1], lambda t: (
            ops.dropout(t, p, generator, seed=seed, offset=offset) if mode == "different"
            else ops.drop_path(t, p, True, generator, seed=seed, offset=offset)))

    @rule("dropout_add")
    def _(info, in_dims, x, residual, p, generator=None, *, seed=None, offset=0):
        mode = _mode(info, seed)
        return _forward(E, mode, (x, residual), in_dims[:2], lambda t, r: (
            ops.dropout_add(t, r, p, generator, seed=seed, offset=offset) if mode == "different"
            else ops.drop_path_add(t, r, p, True, generator, seed=seed, offset=offset)))

    @rule("bias_dropout_add")
    def _(info, in_dims, x, bias, residual, p, generator=None, *, seed=None, offset=0):
        # One bias for all and "different": the op itself. Otherwise the sum
        # the kernels compute, in float32 (float64 for float64), rounded once:
        # residual + dropout(input + bias).
        mode = _mode(info, seed)
        if mode == "different" and in_dims[1] is None:
            return _forward(Rows, mode, (x, residual), (in_dims[0], in_dims[2]), lambda t, r: ops.bias_dropout_add(
                t, bias, r, p, generator, seed=seed, offset=offset))
        size = _batch_size((x, bias, residual), in_dims)
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, bias.dtype), residual.dtype)
        compute = torch.float64 if out_dtype == torch.float64 else torch.float32
        xb = _batch_first(x, in_dims[0], size).to(compute)
        bb = _batch_first(bias, in_dims[1], size).to(compute)
        rb = _batch_first(residual, in_dims[2], size).to(compute)
        shifted = xb + bb.view(size, *([1] * (xb.dim() - 2)), -1)
        (out, mask), out_dims = _forward(Rows, mode, (shifted, rb), (0, 0), lambda t, r: (
            ops.dropout_add(t, r, p, generator, seed=seed, offset=offset) if mode == "different"
            else ops.drop_path_add(t, r, p, True, generator, seed=seed, offset=offset)))
        return (out.to(out_dtype), mask), out_dims

    @rule("drop_path")
    def _(info, in_dims, x, p, scale_by_keep=True, generator=None, *, seed=None, offset=0):
        return _forward(S, _mode(info, seed), (x,), in_dims[:1], lambda t: ops.drop_path(
            t, p, scale_by_keep, generator, seed=seed, offset=offset))

    @rule("drop_path_add")
    def _(info, in_dims, x, residual, p, scale_by_keep=True, generator=None, *, seed=None, offset=0):
        return _forward(S, _mode(info, seed), (x, residual), in_dims[:2], lambda t, r: ops.drop_path_add(
            t, r, p, scale_by_keep, generator, seed=seed, offset=offset))

    @rule("channel_dropout")
    def _(info, in_dims, x, p, generator=None, *, seed=None, offset=0):
        return _forward(C, _mode(info, seed), (x,), in_dims[:1], lambda t: ops.channel_dropout(
            t, p, generator, seed=seed, offset=offset))

    @rule("dropout_")
    def _(info, in_dims, x, p, generator=None, *, seed=None, offset=0):
        mode = _mode(info, seed)
        return _inplace(E, mode, x, in_dims[0],
                        lambda t: ops.dropout_(t, p, generator, seed=seed, offset=offset),
                        lambda t: (ops.dropout(t, p, generator, seed=seed, offset=offset) if mode == "different"
                                   else ops.drop_path(t, p, True, generator, seed=seed, offset=offset)))

    @rule("channel_dropout_")
    def _(info, in_dims, x, p, generator=None, *, seed=None, offset=0):
        return _inplace(C, _mode(info, seed), x, in_dims[0],
                        lambda t: ops.channel_dropout_(t, p, generator, seed=seed, offset=offset),
                        lambda t: ops.channel_dropout(t, p, generator, seed=seed, offset=offset))

    @rule("dropout_low_memory")
    def _(info, in_dims, x, p, generator=None, *, seed=None, offset=0):
        mode = _mode(info, seed)
        _refuse_low_memory_different(mode)
        seed, offset, rng_state = _low_memory_stream(x, p, generator, seed, offset)
        (out, _), _ = _forward(E, "same", (x,), in_dims[:1], lambda t: ops.drop_path(
            t, p, True, seed=seed, offset=offset))
        return (out, rng_state), (0, None)

    @rule("dropout_add_low_memory")
    def _(info, in_dims, x, residual, p, generator=None, *, seed=None, offset=0):
        mode = _mode(info, seed)
        _refuse_low_memory_different(mode)
        seed, offset, rng_state = _low_memory_stream(x, p, generator, seed, offset)
        (out, _), _ = _forward(E, "same", (x, residual), in_dims[:2], lambda t, r: ops.drop_path_add(
            t, r, p, True, seed=seed, offset=offset))
        return (out, rng_state), (0, None)

    @rule("dropout_backward")
    def _(info, in_dims, grad, mask, p):
        return _backward(E, (grad, mask), in_dims, lambda g, m: ops.dropout_backward(g, m, p),
                         lambda g, m: ops.drop_path_backward(g, m, p, True))

    @rule("drop_path_backward")
    def _(info, in_dims, grad, mask, p, scale_by_keep=True):
        call = lambda g, m: ops.drop_path_backward(g, m, p, scale_by_keep)  # noqa: E731
        return _backward(S, (grad, mask), in_dims, call, call)

    @rule("channel_dropout_backward")
    def _(info, in_dims, grad, mask, p):
        call = lambda g, m: ops.channel_dropout_backward(g, m, p)  # noqa: E731
        return _backward(C, (grad, mask), in_dims, call, call)

    @rule("bias_dropout_add_backward")
    def _(info, in_dims, grad, mask, p):
        grad_input, _ = _backward(Rows, (grad, mask), in_dims, lambda g, m: ops.dropout_backward(g, m, p),
                                  lambda g, m: ops.drop_path_backward(g, m, p, True))
        accumulate = torch.float64 if grad_input.dtype == torch.float64 else torch.float32
        rows = grad_input.reshape(grad_input.size(0), -1, grad_input.size(-1))  # (batch, rows, columns)
        grad_bias = rows.sum(1, dtype=accumulate).to(grad_input.dtype)
        return (grad_input, grad_bias), (0, 0)

    @rule("dropout_low_memory_backward")
    def _(info, in_dims, grad, rng_state, p):
        size = _batch_size((grad, rng_state), in_dims)
        g = _batch_first(grad, in_dims[0], size)
        if in_dims[1] is not None:  # a stream per sample: drawn sample by sample
            states = _batch_first(rng_state, in_dims[1], size)
            return torch.stack([ops.dropout_low_memory_backward(g[b].contiguous(), states[b], p)
                                for b in range(size)]), 0
        seed, offset = rng_state.tolist()
        mask = ops.drop_path(g.new_empty(_Elements.count(g.shape), 0), p, True, seed=seed, offset=offset)[1]
        return _backward(E, (g, mask), (0, None), None, lambda t, m: ops.drop_path_backward(t, m, p, True))

    _library = torch.library.Library("regdrop", "IMPL")
    for name in _RANDOM_OPS:
        _library.impl(name, _unbatched_random_call(name), "FuncTorchVmapMode")
