"""The ops layer: fake kernels for torch.ops.regdrop, and autograd for the
in-place ops.

Read next to csrc/schemas.h, which holds the schemas: every op here has the
same argument list. Fake kernels let torch.compile trace the ops without
running them; they mirror the layouts chosen by csrc/walk.h. The other ops'
autograd is in C++ (csrc/autograd.cpp), where it costs a fraction of Python's.
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


def _with_stride(grad: Tensor, stride) -> Tensor:
    """Element masks follow the memory order of the forward output: give ``grad`` its strides."""
    if grad.stride() == tuple(stride):
        return grad
    return grad.new_empty_strided(grad.shape, stride).copy_(grad)


# --- fake kernels -------------------------------------------------------------


def _fake_forward(granularity, input, residual=None):
    x = _walked(input, granularity, residual)
    return torch.empty_like(x), _new_mask(x, _units(x, granularity))


def _fake_low_memory(input, residual=None):
    return torch.empty_like(_walked(input, ELEMENT, residual)), input.new_empty((2,), dtype=torch.int64)


def _fake_backward(granularity, grad, mask):
    units = _units(grad, granularity)
    torch._check(
        mask.numel() == (units + 7) // 8,
        lambda: f"mask must have ceil({units} / 8) bytes for grad, got {mask.numel()}",
    )
    return torch.empty_like(_walked(grad, granularity))


_register_fake = torch.library.register_fake

_register_fake("regdrop::dropout")(lambda input, p, generator=None, *, seed=None, offset=0: _fake_forward(ELEMENT, input))
_register_fake("regdrop::dropout_add")(
    lambda input, residual, p, generator=None, *, seed=None, offset=0: _fake_forward(ELEMENT, input, residual)
)
_register_fake("regdrop::bias_dropout_add")(
    lambda input, bias, residual, p, generator=None, *, seed=None, offset=0: _fake_forward(ROWS, input, residual)
)
_register_fake("regdrop::channel_dropout")(
    lambda input, p, generator=None, *, seed=None, offset=0: _fake_forward(CHANNEL, input)
)
_register_fake("regdrop::drop_path")(
    lambda input, p, scale_by_keep=True, generator=None, *, seed=None, offset=0: _fake_forward(SAMPLE, input)
)
_register_fake("regdrop::drop_path_add")(
    lambda input, residual, p, scale_by_keep=True, generator=None, *, seed=None, offset=0: _fake_forward(
        SAMPLE, input, residual
    )
)
_register_fake("regdrop::dropout_low_memory")(
    lambda input, p, generator=None, *, seed=None, offset=0: _fake_low_memory(input)
)
_register_fake("regdrop::dropout_add_low_memory")(
    lambda input, residual, p, generator=None, *, seed=None, offset=0: _fake_low_memory(input, residual)
)
_register_fake("regdrop::dropout_")(
    lambda input, p, generator=None, *, seed=None, offset=0: _new_mask(input, input.numel())
)
_register_fake("regdrop::channel_dropout_")(
    lambda input, p, generator=None, *, seed=None, offset=0: _new_mask(input, _units(input, CHANNEL))
)
_register_fake("regdrop::dropout_backward")(lambda grad, mask, p: _fake_backward(ELEMENT, grad, mask))
_register_fake("regdrop::channel_dropout_backward")(lambda grad, mask, p: _fake_backward(CHANNEL, grad, mask))
_register_fake("regdrop::drop_path_backward")(
    lambda grad, mask, p, scale_by_keep=True: _fake_backward(SAMPLE, grad, mask)
)
_register_fake("regdrop::dropout_low_memory_backward")(
    lambda grad, rng_state, p: torch.empty_like(_walked(grad, ELEMENT))
)


@_register_fake("regdrop::bias_dropout_add_backward")
def _(grad, mask, p):
    return _fake_backward(ROWS, grad, mask), grad.new_empty((grad.size(-1),))


# --- in-place ops ----------------------------------------------------------------


class InplaceDropout(torch.autograd.Function):
    """Autograd for ``dropout_`` and ``channel_dropout_`` (register_autograd
    does not take ops that mutate their input)."""

    @staticmethod
    def forward(ctx, input, p, generator, granularity):
        inplace_op, ctx.backward_op = {
            ELEMENT: (ops.dropout_, ops.dropout_backward),
            CHANNEL: (ops.channel_dropout_, ops.channel_dropout_backward),
        }[granularity]
        mask = inplace_op(input, p, generator)
        ctx.mark_dirty(input)
        ctx.p = p
        ctx.stride = _walked(input, granularity).stride() if granularity == ELEMENT else None
        ctx.save_for_backward(mask)
        return input

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        grad = grad_output if ctx.stride is None else _with_stride(grad_output, ctx.stride)
        return ctx.backward_op(grad, mask, ctx.p), None, None, None
