"""The ops layer: fake kernels for torch.ops.regdrop.

Read next to csrc/schemas.h, which holds the schemas: every op here has the
same argument list. Fake kernels let torch.compile trace the ops without
running them; they mirror the layouts chosen by csrc/walk.h. Autograd is in
C++ (csrc/autograd.cpp), where it costs a fraction of Python's.
"""

import torch
from torch import Tensor

ops = torch.ops.regdrop

ELEMENT, ROWS, SAMPLE, CHANNEL = "element", "rows", "sample", "channel"


# --- layouts (csrc/walk.h) ----------------------------------------------------


def _is_non_overlapping_and_dense(t: Tensor) -> bool:
    """TensorImpl::is_non_overlapping_and_dense(): some order of the dims is contiguous."""
    dims = sorted((d for d in range(t.dim()) if t.size(d) >= 2), key=t.stride)
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _walkable(t: Tensor, granularity: str) -> bool:
    if not _is_non_overlapping_and_dense(t):
        return False
    if granularity == ROWS:
        return t.is_contiguous()
    if granularity == SAMPLE:
        n = t.size(0)
        return n <= 1 or t.stride(0) == t.numel() // n
    if granularity == CHANNEL:
        return t.is_contiguous() or (8 <= t.size(1) < 2**31 and t.movedim(1, -1).is_contiguous())
    return True


def _walked(input: Tensor, granularity: str, residual: Tensor = None) -> Tensor:
    """The input as the kernels walk it: as it is, or a contiguous copy."""
    same = residual is None or residual.stride() == input.stride()
    return input if same and _walkable(input, granularity) else input.contiguous()


def _units(t: Tensor, granularity: str):
    if granularity == SAMPLE:
        return t.size(0)
    if granularity == CHANNEL:
        return t.size(0) * t.size(1)
    return t.numel()


def _new_mask(like: Tensor, units) -> Tensor:
    return like.new_empty(((units + 7) // 8,), dtype=torch.uint8)


# --- the checks of csrc/checks.h --------------------------------------------
#
# Fake kernels run where the real ones do not: under torch.compile, on meta
# tensors, and for any call that mixes a meta tensor with real ones. So they
# check what the real ops check, in the same order and with the same
# exceptions, and a call that the real op refuses is refused here too.

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_probability(p) -> None:
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"p must be a probability in [0, 1], got {p}")


def _check_floating(t, name: str) -> None:
    if t is None:
        raise RuntimeError(f"{name} must be a tensor, got None")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.layout != torch.strided:
        raise RuntimeError(f"{name} must be a strided (dense) tensor, got {t.layout}")


def _check_same_device(t, name: str, like, like_name: str) -> None:
    if t.device != like.device:
        raise RuntimeError(f"{name} must be on the same device as {like_name} ({like.device}), got {t.device}")


def _check_matches(other, name: str, like, like_name: str) -> None:
    _check_floating(other, name)
    _check_same_device(other, name, like, like_name)
    if other.shape != like.shape:
        raise RuntimeError(
            f"{name} must have the shape of {like_name} {list(like.shape)}, got {list(other.shape)} "
            "(broadcasting is not supported)"
        )


def _check_forward(input, p, generator, seed, offset, needs_dims: int = 0) -> None:
    _check_probability(p)
    _check_floating(input, "input")
    if generator is not None and seed is not None:
        raise RuntimeError("pass either generator or seed, not both")
    if offset < 0:
        raise ValueError(f"offset must be non-negative, got {offset}")
    if seed is None and offset != 0:
        raise ValueError(f"offset={offset} needs seed= too: a generator chooses its own offset")
    if input.dim() < needs_dims:
        what = "have shape (N, C, *) for channel dropout" if needs_dims == 2 else "have a sample dimension (dim 0)"
        raise RuntimeError(f"input must {what}, got {list(input.shape)}")


def _check_bias(input, bias) -> None:
    if input.dim() < 1:
        raise RuntimeError("input must have at least 1 dimension for a bias, got a 0-d tensor")
    _check_floating(bias, "bias")
    _check_same_device(bias, "bias", input, "input")
    if bias.dim() != 1 or bias.shape[0] != input.shape[-1]:
        raise RuntimeError(
            f"bias must be 1-D with the size of input's last dimension ({input.shape[-1]}), got shape "
            f"{list(bias.shape)}"
        )


def _check_backward(grad, p, needs_dims: int = 0) -> None:
    _check_probability(p)
    _check_floating(grad, "grad")
    if grad.dim() < needs_dims:
        raise RuntimeError(f"grad must have at least {needs_dims} dimensions, got {list(grad.shape)}")


def _check_mask(mask, units, grad) -> None:
    if mask is None:
        raise RuntimeError("mask must be a tensor, got None")
    if mask.dtype != torch.uint8:
        raise TypeError(f"mask must be uint8, got {mask.dtype}")
    _check_same_device(mask, "mask", grad, "grad")
    if mask.dim() != 1 or not mask.is_contiguous():
        raise RuntimeError(f"mask must be a contiguous 1-D tensor, got shape {list(mask.shape)}")
    torch._check(
        mask.numel() == (units + 7) // 8,
        lambda: f"mask must have ceil({units} / 8) = {(units + 7) // 8} bytes for grad, got {mask.numel()}",
    )


def _check_rng_state(rng_state, grad) -> None:
    if rng_state is None:
        raise RuntimeError("rng_state must be a tensor, got None")
    if rng_state.dtype != torch.int64:
        raise TypeError(f"rng_state must be int64, got {rng_state.dtype}")
    _check_same_device(rng_state, "rng_state", grad, "grad")
    if rng_state.dim() != 1 or rng_state.numel() != 2 or not rng_state.is_contiguous():
        raise RuntimeError(
            f"rng_state must be a contiguous int64 tensor of 2 elements (seed, offset), got shape "
            f"{list(rng_state.shape)}"
        )


def _check_shard(shard, units) -> None:
    """csrc/checks.h, check_shard(): (first, run, stride) of a shard of a larger call."""
    if shard is None:
        return
    if len(shard) != 3:
        raise ValueError(f"shard must be (first, run, stride), got {list(shard)}")
    first, run, stride = shard
    if not (first >= 0 and run >= 1 and stride >= run):
        raise ValueError(
            f"shard (first, run, stride) needs first >= 0, run >= 1 and stride >= run, got {list(shard)}"
        )
    if units > 0 and first + (units - 1) // run * stride + (units - 1) % run >= 2**63:
        raise ValueError(f"shard {list(shard)} puts units past 2^63 - 1")


# --- fake kernels -------------------------------------------------------------


def _like(x: Tensor, dtype=None) -> Tensor:
    """The output the kernels allocate for walked operand ``x``: its strides,
    size-1 dimensions' included (at::empty_like copies them)."""
    return x.new_empty_strided(x.shape, x.stride(), dtype=dtype)


def _out_dtype(*operands):
    """eager's result dtype for a residual form (csrc/dropout_ops.h, promote())."""
    dtype = operands[0].dtype
    for t in operands[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _fake_forward(granularity, input, residual=None, bias=None, *, shard=None):
    x = _walked(input, granularity, residual)
    _check_shard(shard, _units(x, granularity))
    out_dtype = _out_dtype(*(t for t in (input, bias, residual) if t is not None))
    return _like(x, out_dtype), _new_mask(x, _units(x, granularity))


def _fake_low_memory(input, residual=None, *, shard=None):
    _check_shard(shard, input.numel())
    out_dtype = _out_dtype(input, *(() if residual is None else (residual,)))
    return _like(_walked(input, ELEMENT, residual), out_dtype), input.new_empty((2,), dtype=torch.int64)


def _fake_backward(granularity, grad, mask, p):
    _check_backward(grad, p, {SAMPLE: 1, CHANNEL: 2, ROWS: 1}.get(granularity, 0))
    _check_mask(mask, _units(grad, granularity), grad)
    return _like(_walked(grad, granularity))


_register_fake = torch.library.register_fake


@_register_fake("regdrop::dropout")
def _(input, p, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset)
    return _fake_forward(ELEMENT, input, shard=shard)


@_register_fake("regdrop::dropout_add")
def _(input, residual, p, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset)
    _check_matches(residual, "residual", input, "input")
    return _fake_forward(ELEMENT, input, residual, shard=shard)


@_register_fake("regdrop::bias_dropout_add")
def _(input, bias, residual, p, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset)
    _check_bias(input, bias)
    _check_matches(residual, "residual", input, "input")
    return _fake_forward(ROWS, input, residual, bias, shard=shard)


@_register_fake("regdrop::channel_dropout")
def _(input, p, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset, needs_dims=2)
    return _fake_forward(CHANNEL, input, shard=shard)


@_register_fake("regdrop::drop_path")
def _(input, p, scale_by_keep=True, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset, needs_dims=1)
    return _fake_forward(SAMPLE, input, shard=shard)


@_register_fake("regdrop::drop_path_add")
def _(input, residual, p, scale_by_keep=True, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset, needs_dims=1)
    _check_matches(residual, "residual", input, "input")
    return _fake_forward(SAMPLE, input, residual, shard=shard)


@_register_fake("regdrop::dropout_low_memory")
def _(input, p, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset)
    return _fake_low_memory(input, shard=shard)


@_register_fake("regdrop::dropout_add_low_memory")
def _(input, residual, p, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset)
    _check_matches(residual, "residual", input, "input")
    return _fake_low_memory(input, residual, shard=shard)


def _check_writable(input) -> None:
    if torch._debug_has_internal_overlap(input) == 1:  # at::MemOverlap::Yes
        raise RuntimeError(
            "input has elements that share memory (for example from expand()); an in-place op would write "
            "them more than once. Use the out-of-place op or call .clone() first"
        )


@_register_fake("regdrop::dropout_")
def _(input, p, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset)
    _check_writable(input)
    _check_shard(shard, input.numel())
    return _new_mask(input, input.numel())


@_register_fake("regdrop::channel_dropout_")
def _(input, p, generator=None, *, seed=None, offset=0, shard=None):
    _check_forward(input, p, generator, seed, offset, needs_dims=2)
    _check_writable(input)
    _check_shard(shard, _units(input, CHANNEL))
    return _new_mask(input, _units(input, CHANNEL))


_register_fake("regdrop::dropout_backward")(lambda grad, mask, p: _fake_backward(ELEMENT, grad, mask, p))
_register_fake("regdrop::channel_dropout_backward")(lambda grad, mask, p: _fake_backward(CHANNEL, grad, mask, p))
_register_fake("regdrop::drop_path_backward")(
    lambda grad, mask, p, scale_by_keep=True: _fake_backward(SAMPLE, grad, mask, p)
)


@_register_fake("regdrop::dropout_low_memory_backward")
def _(grad, rng_state, p, *, shard=None):
    _check_backward(grad, p)
    _check_rng_state(rng_state, grad)
    _check_shard(shard, grad.numel())
    return _like(_walked(grad, ELEMENT))


@_register_fake("regdrop::bias_dropout_add_backward")
def _(grad, mask, p):
    grad_input = _fake_backward(ROWS, grad, mask, p)
    return grad_input, grad.new_empty((grad.size(-1),))


# --- functionalization --------------------------------------------------------
#
# Under torch.compile an in-place op would become an auto_functionalized node,
# which carries no nondeterministic_seeded tag: the partitioner, which replays
# the generator only for tagged ops, would recompute it (checkpointing) from
# another stream. As the functional op and a copy_ into the input, traced
# graphs hold the tagged op itself, and recomputation draws the same mask.


def _functionalize_inplace(functional):
    def kernel(input, p, generator=None, *, seed=None, offset=0, shard=None):
        out, mask = functional(input, p, generator, seed=seed, offset=offset, shard=shard)
        input.copy_(out)
        return mask

    return kernel


_functionalization = torch.library.Library("regdrop", "IMPL")
_functionalization.impl("dropout_", _functionalize_inplace(ops.dropout), "Functionalize")
_functionalization.impl("channel_dropout_", _functionalize_inplace(ops.channel_dropout), "Functionalize")
