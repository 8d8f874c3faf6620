"""The meta (fake) kernels are the real op bodies: they agree with the real
kernels on every output's shape, dtype and strides, and refuse what the real
ones refuse, with the same exception, for any strides, overlaps and dtype
mixes; torch.compile(fullgraph=True), which checks the strides the fake
kernels promise against what the real kernels return, runs them all.
"""

import math

import pytest
import torch
import torch._dynamo.testing  # CompileCounter: not imported by torch itself
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import call_op
from regdrop_ext import manifest

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORWARD = manifest.ops("masked", "low_memory", "in_place")


@st.composite
def strided(draw, shape, dtype):
    """A tensor of ``shape`` with random strides: permuted, stepped, with
    size-1 and zero strides (overlapping elements), over a storage of its own."""
    order = draw(st.permutations(range(len(shape))))
    steps = [draw(st.sampled_from([1, 1, 2])) for _ in shape]
    strides, span = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = span * steps[d]
        span *= shape[d] * steps[d]
    strides = [draw(st.sampled_from([s, 0, 7])) if n == 1 else (0 if draw(st.integers(0, 9)) == 0 else s)
               for n, s in zip(shape, strides)]
    storage = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if math.prod(shape) else 0
    base = torch.randn(storage + 1, dtype=torch.float64).to(dtype)
    return base.as_strided(shape, strides, draw(st.integers(0, 1)) if storage else 0)


@st.composite
def calls(draw, op):
    """Operands of ``op``: any shape (sometimes too few dims), strides and float dtypes, a bias of
    the last dim's size or not, and p in or out of [0, 1]."""
    shape = draw(st.lists(st.integers(0, 4), min_size=draw(st.integers(0, 1)), max_size=4))
    x = draw(strided(shape, draw(st.sampled_from(FLOATS))))
    residual = draw(strided(shape, draw(st.sampled_from(FLOATS))))
    bias_len = (shape[-1] if shape else 1) + draw(st.sampled_from([0, 0, 0, 1]))
    bias = draw(strided([bias_len], draw(st.sampled_from(FLOATS))))
    p = draw(st.sampled_from([0.0, 0.3, 1.0, 1.5]))
    return x, residual, bias, p


def outcome(call):
    try:
        return call(), None
    except (ValueError, TypeError, RuntimeError) as error:
        return None, type(error)


def describe(result):
    tensors = result if isinstance(result, tuple) else (result,)
    return [(tuple(t.shape), t.dtype, t.stride()) for t in tensors]


def copy(t):
    """``t``'s values in a tensor of its strides (for the in-place ops to write); an
    overlapping ``t`` itself, which they refuse."""
    if torch._debug_has_internal_overlap(t) == 1:
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def real_and_fake(call, *tensors):
    real, real_error = outcome(lambda: call(*(copy(t) for t in tensors)))
    with FakeTensorMode() as mode:
        fake, fake_error = outcome(lambda: call(*(mode.from_tensor(t) for t in tensors)))
    return (real, real_error), (fake, fake_error)


@pytest.mark.parametrize("op", FORWARD, ids=lambda op: op.name)
@SETTINGS
@given(data=st.data())
def test_fake_and_real_forward_ops_agree(op, data):
    x, residual, bias, p = data.draw(calls(op))

    def call(x, residual, bias):
        return call_op(op, x, p, residual=residual, bias=bias, seed=1)

    (real, real_error), (fake, fake_error) = real_and_fake(call, x, residual, bias)
    assert real_error == fake_error
    if real_error is None:
        assert describe(real) == describe(fake)


@pytest.mark.parametrize("op", manifest.ops("backward", "low_memory_backward"), ids=lambda op: op.name)
@SETTINGS
@given(data=st.data())
def test_fake_and_real_backward_ops_agree(op, data):
    shape = data.draw(st.lists(st.integers(0, 4), min_size=data.draw(st.integers(0, 1)), max_size=4))
    grad = data.draw(strided(shape, data.draw(st.sampled_from(FLOATS))))
    forward = next(f for f in manifest.ops("masked", "low_memory") if f.backward == op.name)
    units = forward.units(shape) if len(shape) >= {"sample": 1, "channel": 2}.get(op.unit, 0) else 0
    flaw = data.draw(st.sampled_from(["none", "none", "short", "dtype"]))
    if op.variant == "low_memory_backward":
        saved = torch.tensor([1, 0], dtype=torch.int64 if flaw != "dtype" else torch.int32)
    else:
        saved = torch.zeros(max(0, (units + 7) // 8 - (flaw == "short")),
                            dtype=torch.uint8 if flaw != "dtype" else torch.int16)
    (real, real_error), (fake, fake_error) = real_and_fake(lambda g, s: op.op(g, s, 0.5), grad, saved)
    assert real_error == fake_error
    if real_error is None:
        assert describe(real) == describe(fake)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compiled_calls_equal_eager_calls(data):
    """fullgraph Inductor over random ops, strides and dtype mixes: it asserts
    the real outputs' strides are the fake kernels', and the results are eager's."""
    op = data.draw(st.sampled_from(manifest.ops("masked", "low_memory")))
    shape = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
    x = data.draw(strided(shape, data.draw(st.sampled_from(FLOATS))))
    residual = data.draw(strided(shape, data.draw(st.sampled_from(FLOATS))))
    bias = torch.randn(shape[-1], dtype=data.draw(st.sampled_from(FLOATS)))
    args, kwargs = op.arguments({"input": x, "residual": residual, "bias": bias, "p": 0.5, "seed": 2})
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op.op(*a, **kwargs)[0].reshape(-1) * 1, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*args), op.op(*args, **kwargs)[0].reshape(-1), rtol=0, atol=0,
                               equal_nan=True)


def test_symbolic_shapes_compile_once():
    """dynamic=True: the meta kernels run on symbolic sizes; one graph serves every size."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    f = torch.compile(lambda t, r: manifest.OPS["dropout_add"].op(t, r, 0.5, seed=1)[0] * 2, backend=counter,
                      fullgraph=True, dynamic=True)
    for n in (10, 33, 1000):
        x, r = torch.ones(n, 3), torch.zeros(n, 3)
        assert torch.equal(f(x, r), manifest.OPS["dropout_add"].op(x, r, 0.5, seed=1)[0] * 2)
    assert counter.frame_count == 1
