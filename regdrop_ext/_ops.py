"""The ops layer: fake kernels and autograd for torch.ops.regdrop.

Read next to csrc/ops.cpp, which holds the schemas: each op here has the same
argument list. Fake kernels let torch.compile trace the ops without running
them; they mirror the output layouts of csrc/dropout_ops.h.
"""

import torch
from torch import Tensor

ops = torch.ops.regdrop


def _is_non_overlapping_and_dense(t: Tensor) -> bool:
    """TensorImpl::is_non_overlapping_and_dense(): some order of the dims is contiguous."""
    dims = sorted(
        (d for d in range(t.dim()) if t.size(d) >= 2),  # size-0/1 dims have any stride
        key=lambda d: t.stride(d),
    )
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _dense(t: Tensor) -> Tensor:
    """The tensor the kernels walk in memory order (``dense()`` in C++)."""
    return t if _is_non_overlapping_and_dense(t) else t.contiguous()


def _new_mask(like: Tensor, units) -> Tensor:
    return like.new_empty(((units + 7) // 8,), dtype=torch.uint8)


def _with_stride(grad: Tensor, stride) -> Tensor:
    """Masks follow the memory order of the forward output; give ``grad`` its strides."""
    if grad.stride() == tuple(stride):
        return grad
    return grad.new_empty_strided(grad.shape, stride).copy_(grad)


# dropout ---------------------------------------------------------------------


@torch.library.register_fake("regdrop::dropout")
def _(input, p, generator=None, *, seed=None, offset=0):
    x = _dense(input)
    return torch.empty_like(x), _new_mask(x, x.numel())


@torch.library.register_fake("regdrop::dropout_")
def _(input, p, generator=None, *, seed=None, offset=0):
    return _new_mask(input, input.numel())


@torch.library.register_fake("regdrop::dropout_backward")
def _(grad, mask, p):
    torch._check(
        mask.numel() == (grad.numel() + 7) // 8,
        lambda: f"mask must have ceil({grad.numel()} / 8) bytes for grad, got {mask.numel()}",
    )
    return torch.empty_like(_dense(grad))


def _dropout_setup_context(ctx, inputs, keyword_only_inputs, output):
    _, p, _ = inputs
    out, mask = output
    ctx.p = p
    ctx.stride = out.stride()
    ctx.save_for_backward(mask)


def _dropout_backward(ctx, grad_output, _grad_mask):
    (mask,) = ctx.saved_tensors
    grad = _with_stride(grad_output, ctx.stride)
    return ops.dropout_backward(grad, mask, ctx.p), None, None


torch.library.register_autograd(
    "regdrop::dropout", _dropout_backward, setup_context=_dropout_setup_context
)


def _dropout_backward_setup_context(ctx, inputs, output):
    _, mask, p = inputs
    ctx.p = p
    ctx.stride = output.stride()
    ctx.save_for_backward(mask)


def _dropout_backward_backward(ctx, grad_output):
    # dropout_backward is linear in grad: its derivative is itself.
    (mask,) = ctx.saved_tensors
    grad = _with_stride(grad_output, ctx.stride)
    return ops.dropout_backward(grad, mask, ctx.p), None, None


torch.library.register_autograd(
    "regdrop::dropout_backward",
    _dropout_backward_backward,
    setup_context=_dropout_backward_setup_context,
)


class DropoutInplace(torch.autograd.Function):
    """Autograd for ``dropout_``: register_autograd does not take mutating ops."""

    @staticmethod
    def forward(ctx, input, p, generator):
        mask = ops.dropout_(input, p, generator)
        ctx.mark_dirty(input)
        ctx.p = p
        ctx.stride = _dense(input).stride()
        ctx.save_for_backward(mask)
        return input

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        grad = _with_stride(grad_output, ctx.stride)
        return ops.dropout_backward(grad, mask, ctx.p), None, None
