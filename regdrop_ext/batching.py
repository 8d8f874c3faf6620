"""vmap for the regdrop ops (torch.func.vmap): a batching rule per op of the
manifest, written once per variant.

A vmapped call runs as ONE call of an op on the whole batch, laid out so
that the units it draws (or reads) are the ones the per-sample calls would:

* ``randomness="different"``: the batch goes first, so sample b's units
  follow sample b - 1's in one stream; each sample gets its own mask.
* ``randomness="same"``: the batch goes inside each unit, so every sample
  shares one mask: an element of the batch becomes a row of a sample-unit op
  with the same operands (one unit per row, with dropout's scale), a channel
  or a sample keeps its unit with the batch inside it.
* ``randomness="error"`` (vmap's default) refuses a random op, as torch does.
* A call with an explicit ``seed`` is not random: every sample draws the
  stream (seed, offset), so they all share its mask, whatever the mode, and
  each sample's result is the op's on that sample alone.
* A random op on tensors vmap does not batch still follows the mode, through
  a kernel on the FuncTorchVmapMode key (as torch's random ops do): "error"
  raises, "same" draws once, "different" draws per sample (in-place ops on
  an unbatched tensor refuse "different", as torch's do).

Under vmap an element mask follows each sample's memory order, as the op's
on that sample alone would: the input's where every operand's samples share
its strides, row-major where they do not (the op then walks contiguous
copies), and every operand is read element for element in that one order.
The masks of "different" are batched along dim 0, one row of
ceil(units / 8) bytes per sample. Backward ops follow their mask: a batched
mask reads the batch first, an unbatched one inside each unit. So
per-sample gradients (vmap of torch.func.grad) work. Low-memory ops support
"same" and explicit seeds; "different" raises, as an rng_state cannot say
where in one stream a sample's units start.
"""

import math

import torch
from torch import Tensor

from . import manifest
from .manifest import CHANNEL, ELEMENT, SAMPLE

RANDOMNESS_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use the 'same' or "
    "'different' randomness flags on vmap or perform the randomness operation out of vmap"
)
_INPLACE_DIFFERENT_ERROR = (
    "vmap: Cannot ask for different inplace randomness on an unbatched tensor. This will appear like same "
    "randomness. If this is necessary for your usage, please file an issue with functorch."
)


# --- batches and masks ------------------------------------------------------------


def _batch_size(tensors, dims) -> int:
    return next(t.size(d) for t, d in zip(tensors, dims) if t is not None and d is not None)


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
    if units % 8 == 0:  # contiguous: an expanded row of one shared mask is a stride-0 view
        return rows.reshape(-1).contiguous()
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
    """Each element is a unit, numbered in its sample's memory order, as the
    op on that sample alone numbers it: row-major where it walks contiguous
    copies (operands of different layouts, or a bias: its rows); "same"
    makes each element a row of the batch."""

    def __init__(self, rows: bool = False) -> None:
        self.rows = rows

    def order(self, like: Tensor, shared: bool = True):
        """The sample dims of ``like`` (batch first) in the order its units are numbered;
        ``shared``: every operand's samples have like's strides."""
        return list(range(1, like.dim())) if self.rows or not shared else _memory_order(like)

    @staticmethod
    def count(shape) -> int:
        return math.prod(shape[1:])

    @staticmethod
    def lay(t: Tensor, mode: str, order) -> Tensor:
        ordered = t.permute(0, *order)
        return ordered.contiguous() if mode == "different" else ordered.movedim(0, -1).reshape(-1, t.size(0))

    @staticmethod
    def back(out: Tensor, mode: str, like: Tensor, order) -> Tensor:
        order = [0, *order]
        shape = [like.size(d) for d in order]
        ordered = out.view(shape) if mode == "different" else out.view(*shape[1:], shape[0]).movedim(-1, 0)
        return ordered.permute(sorted(range(len(order)), key=order.__getitem__))


class _Samples:
    """Drop-path: a sample (N, *R) has N units."""

    @staticmethod
    def order(like: Tensor, shared: bool = True):
        return None

    @staticmethod
    def count(shape) -> int:
        return shape[1]

    @staticmethod
    def lay(t: Tensor, mode: str, order) -> Tensor:
        return t.flatten(0, 1) if mode == "different" else t.movedim(0, 1).contiguous()

    @staticmethod
    def back(out: Tensor, mode: str, like: Tensor, order) -> Tensor:
        return out.view(like.shape) if mode == "different" else out.movedim(1, 0)


class _Channels:
    """Channel dropout: a sample (N, C, *S) has N * C units."""

    @staticmethod
    def order(like: Tensor, shared: bool = True):
        return None

    @staticmethod
    def count(shape) -> int:
        return shape[1] * shape[2]

    @staticmethod
    def lay(t: Tensor, mode: str, order) -> Tensor:
        return t.flatten(0, 1) if mode == "different" else t.movedim(0, 2).contiguous()

    @staticmethod
    def back(out: Tensor, mode: str, like: Tensor, order) -> Tensor:
        return out.view(like.shape) if mode == "different" else out.movedim(2, 0)


def _units(op: manifest.Op):
    return {ELEMENT: _Elements(rows=op.bias), SAMPLE: _Samples(), CHANNEL: _Channels()}[op.unit]


def _same_op(op: manifest.Op) -> manifest.Op:
    """The op that, with the batch inside each unit, draws one mask for every
    sample: for element units, the sample-unit op with the same operands
    (each element a row), called with dropout's scale."""
    if op.unit != ELEMENT:
        return op
    variant = "backward" if op.variant in ("backward", "low_memory_backward") else "masked"
    return manifest.find(SAMPLE, op.residual and op.is_forward, variant=variant)


# --- rules -----------------------------------------------------------------------


def _forward(op, mode, bound, dims, units=None):
    """``op`` (or its "same" op) once over the batch: (output, mask), batched
    as vmap expects. Its input and residual are laid out for the units; a
    bias passes as it is (one for all)."""
    names = [n for n in op.tensors if n != "bias"]
    size = _batch_size([bound[n] for n in names], [dims[n] for n in names])
    batched = {n: _batch_first(bound[n], dims[n], size) for n in names}
    units, like = units or _units(op), batched["input"]
    order = units.order(like, shared=all(batched[n].stride()[1:] == like.stride()[1:] for n in names))
    call = dict(bound, **{n: units.lay(batched[n], mode, order) for n in names})
    target = op if mode == "different" else _same_op(op)
    if target.scale_by_keep and not op.scale_by_keep:
        call["scale_by_keep"] = True  # an element drawn as a row: dropout's scale
    out, mask = target.call(call)
    out = units.back(out, mode, like, order)
    if mode == "same":
        return (out, mask), (0, None)
    return (out, _rows(mask, size, units.count(like.shape))), (0, 0)


def _bias_forward(mode, bound, dims):
    """A bias per sample, or "same": the sum the kernels compute, in float32
    (float64 for float64), rounded once: residual + dropout(input + bias),
    through the element op with a residual, its units row-major as the op
    walks its rows."""
    names = ("input", "bias", "residual")
    size = _batch_size([bound[n] for n in names], [dims[n] for n in names])
    out_dtype = torch.promote_types(torch.promote_types(bound["input"].dtype, bound["bias"].dtype),
                                    bound["residual"].dtype)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    x, b, r = (_batch_first(bound[n], dims[n], size).to(compute) for n in names)
    call = dict(bound, input=x + b.view(size, *([1] * (x.dim() - 2)), -1), residual=r)
    (out, mask), out_dims = _forward(manifest.find(ELEMENT, residual=True), mode, call,
                                     {"input": 0, "residual": 0}, units=_Elements(rows=True))
    return (out.to(out_dtype), mask), out_dims


def _in_place(op, mode, bound, dims):
    """In place on the batch: the in-place op where the layout is a view of
    the batch's own memory, else the op and a copy back. The mask argument
    is written: a row per sample ("different": it must be batched), or the
    one shared mask ("same": in every row, if it is batched)."""
    units = _units(op)
    batched = bound["input"].movedim(dims["input"], 0)
    if mode == "different" and dims["mask"] is None:
        raise RuntimeError(f"vmap: regdrop.{op.name} with randomness='different' writes a mask per sample, into "
                           "an unbatched mask: pass a batched mask (as input.new_empty makes under vmap)")
    order = units.order(batched)
    laid = units.lay(batched, mode, order)
    if mode == "different" and batched.is_contiguous() and laid.data_ptr() == batched.data_ptr():
        _, mask = op.call(dict(bound, input=laid, mask=op.new_mask(laid)))  # laid views batched's memory
    else:
        functional = manifest.OPS[op.forward]
        call = dict(bound, input=laid)
        if mode == "same" and op.unit == ELEMENT:
            call["scale_by_keep"] = True  # an element drawn as a row: dropout's scale
        out, mask = (functional if mode == "different" else _same_op(functional)).call(call)
        batched.copy_(units.back(out, mode, batched, order))
    written = bound["mask"] if dims["mask"] is None else bound["mask"].movedim(dims["mask"], 0)
    written.copy_(mask if mode == "same" else _rows(mask, batched.size(0), units.count(batched.shape)))
    return (bound["input"], bound["mask"]), (dims["input"], dims["mask"])


def _low_memory(op, mode, bound, dims):
    """"same" (or a seed): one stream for every sample, drawn from the
    generator by the op on one element, or given; the "same" op of the
    op's masked form draws it for the batch."""
    if mode == "different":
        raise RuntimeError(
            "vmap: low-memory dropout does not support randomness='different' (an rng_state cannot say where "
            "in one stream each sample's units start); use the default mask mode, or randomness='same'"
        )
    if bound.get("seed") is None:
        one = bound["input"].new_empty(1)
        _, rng_state = op.call(dict(bound, input=one, residual=one))
        seed, offset = rng_state.tolist()
    else:
        seed, offset = bound["seed"], bound["offset"]
        rng_state = torch.tensor([seed, offset], dtype=torch.int64, device=bound["input"].device)
    call = dict(bound, seed=seed, offset=offset, generator=None)
    (out, _), _ = _forward(manifest.OPS[op.forward], "same", call, dims)
    return (out, rng_state), (0, None)


def _backward(op, bound, dims, units=None):
    """``op`` over the batch: a batched mask reads the batch first, an
    unbatched one (the "same" masks) inside each unit."""
    size = _batch_size([bound["grad"], bound["mask"]], [dims["grad"], dims["mask"]])
    units = units or _units(op)
    g = _batch_first(bound["grad"], dims["grad"], size)
    order = units.order(g)
    if dims["mask"] is None:
        target = _same_op(op)
        call = dict(bound, grad=units.lay(g, "same", order))
        if target.scale_by_keep and not op.scale_by_keep:
            call["scale_by_keep"] = True
        return units.back(target.call(call), "same", g, order), 0
    rows = _batch_first(bound["mask"], dims["mask"], size)
    call = dict(bound, grad=units.lay(g, "different", order), mask=_joined(rows, units.count(g.shape)))
    return units.back(op.call(call), "different", g, order), 0


def _bias_backward(bound, dims):
    """grad_input through the element mask (row-major units), computed in
    float32 (float64 for float64) as the kernels compute it, and rounded once;
    grad_bias the sums of those values over each sample's rows, rounded once."""
    dtype = bound["grad"].dtype
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    wide, _ = _backward(manifest.find(ELEMENT, False, variant="backward"), dict(bound, grad=bound["grad"].to(accumulate)),
                        dims, units=_Elements(rows=True))
    rows = wide.reshape(wide.size(0), -1, wide.size(-1))  # (batch, rows, columns)
    return (wide.to(dtype), rows.sum(1).to(dtype)), (0, 0)


def _low_memory_backward(op, bound, dims):
    """A batched rng_state: a stream per sample, drawn sample by sample, each
    in its own memory order; an unbatched one: its mask drawn once, read as
    a "same" mask."""
    grad, rng_state = bound["grad"], bound["rng_state"]
    size = _batch_size([grad, rng_state], [dims["grad"], dims["rng_state"]])
    g = _batch_first(grad, dims["grad"], size)
    if dims["rng_state"] is not None:
        states = _batch_first(rng_state, dims["rng_state"], size)
        return torch.stack([op.call(dict(bound, grad=g[b], rng_state=states[b])) for b in range(size)]), 0
    seed, offset = rng_state.tolist()
    mask = manifest.find(SAMPLE, False).call(
        {"input": g.new_empty(_Elements.count(g.shape), 0), "p": bound["p"], "seed": seed, "offset": offset})[1]
    return _backward(manifest.find(ELEMENT, False, variant="backward"), {"grad": g, "mask": mask, "p": bound["p"]},
                     {"grad": 0, "mask": None})


def _rule(op: manifest.Op):
    """The batching rule of ``op``: the arguments bound by name, then its variant's rule."""

    def rule(info, in_dims, *args, **kwargs):
        bound = op.bind(args, kwargs)
        dims = {n: (in_dims[k] if k < len(in_dims) else None) for k, n in enumerate(
            arg.name for arg in op.op.default._schema.arguments)}
        if bound.get("shard") is not None:
            raise RuntimeError(
                f"vmap: regdrop.{op.name} does not batch a shard of a larger call (shard={list(bound['shard'])}); "
                "call it per sample, or on the whole tensor"
            )
        bound.pop("shard", None)
        if op.variant == "backward":
            return _bias_backward(bound, dims) if op.bias else _backward(op, bound, dims)
        if op.variant == "low_memory_backward":
            return _low_memory_backward(op, bound, dims)
        mode = _mode(info, bound.get("seed"))
        if op.variant == "in_place":
            return _in_place(op, mode, bound, dims)
        if op.variant == "low_memory":
            return _low_memory(op, mode, bound, dims)
        if op.bias and (mode != "different" or dims["bias"] is not None):
            return _bias_forward(mode, bound, dims)
        return _forward(op, mode, bound, dims)

    return rule


class _Info:
    randomness = "different"


def _unbatched_random_call(op: manifest.Op, rule):
    """The FuncTorchVmapMode kernel of random op ``op``: it runs first for
    every call under vmap. With a batched tensor or a seed it passes the
    call on (to the batching rule, or as a deterministic call); on tensors
    vmap does not batch it applies the randomness mode, as torch's random ops
    do: "error" raises, "same" draws once for all, "different" draws per
    sample (the rule, over the tensors expanded to the batch)."""
    vmap_mode = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)

    def kernel(*args, **kwargs):
        interpreter = torch._functorch.pyfunctorch.retrieve_current_functorch_interpreter()
        tensors = [a for a in args if isinstance(a, Tensor)]
        with torch._C._ExcludeDispatchKeyGuard(vmap_mode):
            if kwargs.get("seed") is not None or any(torch._C._functorch.is_batchedtensor(t) for t in tensors):
                return op.op(*args, **kwargs)
            mode = interpreter.randomness()
            if mode == "error":
                raise RuntimeError(RANDOMNESS_ERROR)
            if mode == "same":
                return op.op(*args, **kwargs)
            if op.variant == "in_place":
                raise RuntimeError(_INPLACE_DIFFERENT_ERROR)
            size, level = interpreter.batch_size(), interpreter.level()
            expanded = [a.unsqueeze(0).expand(size, *a.shape) if isinstance(a, Tensor) else a for a in args]
            in_dims = tuple(0 if isinstance(a, Tensor) else None for a in args)
            outputs, out_dims = rule(_Info(), in_dims, *expanded, **kwargs)
            return tuple(o if d is None else torch._C._functorch._add_batch_dim(o, d, level)
                         for o, d in zip(outputs, out_dims))

    return kernel


_library = None  # keeps the FuncTorchVmapMode registrations alive


def register() -> None:
    """Registers every rule (called once, at import)."""
    global _library
    _library = torch.library.Library("regdrop", "IMPL")
    for op in manifest.ops():
        rule = _rule(op)
        torch.library.register_vmap(f"regdrop::{op.name}", rule)
        if op.is_forward:
            _library.impl(op.name, _unbatched_random_call(op, rule), "FuncTorchVmapMode")
