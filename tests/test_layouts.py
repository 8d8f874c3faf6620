"""Output layouts as PyTorch's, for every input layout, forward and backward.

A drop-in op gives what torch's op gives: the input's strides when it is
dense, its suggested memory format when not (what empty_like(input) gives);
a residual form gives the eager expression's layout whenever input and
residual share their strides, and contiguous otherwise. Each case compares
strides with the native op or expression on the same operands, values with
the reference under the op's own mask, and the fake (meta) kernel's strides
with the real ones (under torch.compile too).
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import call_op
from reference import keep_scale, masked_reference, unit_numbers, unpack_bits
from regdrop_ext import manifest

P = 0.3
SEED = dict(seed=3, offset=4)
CL, CL3 = torch.channels_last, torch.channels_last_3d
DENSE = {  # name: (shape of the source tensor, its layout)
    "contiguous": ((2, 3, 4, 6), lambda t: t),
    "channels_last": ((2, 3, 4, 6), lambda t: t.contiguous(memory_format=CL)),
    "channels_last, 9 channels": ((2, 9, 2, 3), lambda t: t.contiguous(memory_format=CL)),
    "channels_last_3d": ((2, 3, 2, 3, 4), lambda t: t.contiguous(memory_format=CL3)),
    "transposed": ((2, 3, 4, 6), lambda t: t.transpose(0, 2)),
}
LAYOUTS = {
    **DENSE,
    **{f"{name}, sliced": (shape, lambda t, f=f: f(t)[..., ::2]) for name, (shape, f) in DENSE.items()},
    **{f"{name}, stepped": (shape, lambda t, f=f: f(t)[:, :, 1:]) for name, (shape, f) in DENSE.items()},
    "expanded": ((1, 3, 4, 6), lambda t: t.expand(3, 3, 4, 6)),
    "empty": ((0, 3, 4, 6), lambda t: t),
    "one element": ((1, 1, 1, 1), lambda t: t),
}


def make(layout, scale=1.0, seed=0):
    """A tensor in ``layout``, values in [0.5, 1.5) * scale (never 0)."""
    shape, lay = LAYOUTS[layout]
    return lay((torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5) * scale)


def operands(op, layout, residual_layout="shared"):
    x = make(layout)
    residual = make(layout, 0.25, seed=1) if residual_layout == "shared" else make(layout, 0.25, seed=1).contiguous()
    return x, residual, torch.rand(x.shape[-1]) + 0.5


def native(op, x, residual, bias):
    """The native op (or eager expression) ``op`` replaces, on the same operands."""
    if op.unit == "sample":
        y = x * torch.ones((x.shape[0],) + (1,) * (x.dim() - 1))  # timm's drop_path: x * mask
    elif op.unit == "channel":
        y = torch.feature_dropout(x, 1e-9, True)
    else:
        y = F.dropout(x + bias if op.bias else x, 1e-9)
    return residual + y if op.residual else y


def reference(op, x, residual, bias, out, saved):
    """The op's value under its own mask (or, low-memory, under the elements it kept)."""
    if op.variant == "low_memory":
        keep = out != residual.to(out.dtype) if op.residual else out != 0
    else:
        numbers = unit_numbers(op.unit, out, rows=op.bias).flatten()
        keep = unpack_bits(saved, op.units(x.shape))[numbers].view(out.shape)
    return masked_reference(x, keep, keep_scale(P), residual=residual if op.residual else None,
                            bias=bias if op.bias else None)


def fake_strides(call, *tensors):
    with FakeTensorMode() as mode:
        return call(*(mode.from_tensor(t) for t in tensors)).stride()


@pytest.mark.parametrize("op", manifest.ops("masked", "low_memory"), ids=lambda op: op.name)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_strides_are_torchs(op, layout):
    for residual_layout in ("shared", "contiguous") if op.residual else ("shared",):
        x, residual, bias = operands(op, layout, residual_layout)

        def call(x, residual, bias):
            return call_op(op, x, P, residual=residual, bias=bias, **SEED)[0]

        out, saved = call_op(op, x, P, residual=residual, bias=bias, **SEED)
        where = f"{op.name}, residual {residual_layout}"
        expected = native(op, x, residual, bias).stride() if residual_layout == "shared" else \
            torch.empty(x.shape).stride()
        if out.numel() > 1:  # torch's own strides of size-1 dims vary
            assert out.stride() == expected, where
        torch.testing.assert_close(out, reference(op, x, residual, bias, out, saved), rtol=0, atol=0, msg=where)
        assert fake_strides(call, x, residual, bias) == out.stride(), where


@pytest.mark.parametrize("op", manifest.ops("in_place"), ids=lambda op: op.name)
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "expanded"])
def test_in_place_ops_write_every_layout_as_the_out_of_place_op(op, layout):
    """In place, the input keeps its layout, and holds what the out-of-place
    op returns for it: the same mask, as units are numbered alike."""
    x = make(layout)
    expected, expected_mask = call_op(manifest.OPS[op.forward], x, P, **SEED)
    written = make(layout)
    out, mask = call_op(op, written, P, **SEED)
    assert out is written and torch.equal(mask, expected_mask)
    assert torch.equal(written, expected)


def grad_strides(f, x):
    """The strides of the gradient that reaches ``x`` (as a non-leaf: no
    AccumulateGrad to lay it out again) for an incoming gradient in the
    output's layout, as the layers after it give one."""
    y = x.detach().requires_grad_() * 1  # a dense x's layout
    out = f(y)
    (grad,) = torch.autograd.grad(out, y, torch.ones_like(out))
    return grad.stride()


@pytest.mark.parametrize("op", manifest.ops("masked", "low_memory"), ids=lambda op: op.name)
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if "sliced" not in name and "stepped" not in name])
def test_gradients_take_the_inputs_layout(op, layout):
    """The input's gradient comes in the layout torch's op gives it (the
    input's, for dense inputs): a channels-last network keeps its layout."""
    x, residual, bias = operands(op, layout)
    if x.numel() <= 1 or torch.empty_like(x).stride() != x.stride():  # not dense
        return
    ours = grad_strides(lambda t: call_op(op, t, P, residual=residual, bias=bias, **SEED)[0], x)
    theirs = grad_strides(lambda t: native(op, t, residual, bias), x)
    assert ours == theirs


@pytest.mark.parametrize("op", manifest.ops("backward", "low_memory_backward"), ids=lambda op: op.name)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_ops_give_torchs_layout_for_grad(op, layout):
    """A backward op's output: grad's layout where dense, else its suggested
    format, as native_dropout_backward gives; the fake kernel agrees."""
    grad = make(layout)
    forward = next(f for f in manifest.ops("masked", "low_memory") if f.backward == op.name)
    saved = call_op(forward, grad.contiguous(), P, residual=grad.contiguous(), bias=torch.ones(grad.shape[-1]),
                    **SEED)[1]
    out = op.op(grad, saved, P)
    out = out[0] if isinstance(out, tuple) else out
    expected = torch.empty_like(grad).stride()
    if out.numel() > 1:
        assert out.stride() == expected
    call = lambda g, s: (lambda r: r[0] if isinstance(r, tuple) else r)(op.op(g, s, P))  # noqa: E731
    assert fake_strides(call, grad, saved) == out.stride()


COMPILED_LAYOUTS = ["channels_last, sliced", "transposed", "channels_last_3d, stepped"]


@pytest.mark.parametrize("op", manifest.ops("masked"), ids=lambda op: op.name)
def test_compiled_calls_have_the_eager_strides(op):
    """Inductor checks each output's strides against the fake kernel's, and
    the code after the op depends on them (a view)."""
    torch._dynamo.reset()
    for layout in COMPILED_LAYOUTS:
        x, residual, bias = operands(op, layout)
        args, kwargs = op.arguments({"input": x, "residual": residual, "bias": bias, "p": P, **SEED})
        f = torch.compile(lambda *args: op.op(*args, **kwargs)[0].flatten(), fullgraph=True)
        assert torch.equal(f(*args), op.op(*args, **kwargs)[0].flatten()), layout
