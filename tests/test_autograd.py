"""Autograd of every op of the manifest, in both modes.

For a given mask every op is linear in its differentiable operands, so its
derivatives are exact: reverse mode (grad, vjp, double backward) and forward
mode (jvp, jacfwd, forward_ad dual tensors, hessians as forward over reverse)
must give the mask's algebra: mask * s * (t_input + t_bias) + t_residual.
gradcheck compares both modes with finite differences (float64); the tests
below compare them with that formula and with each other, bit for bit.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import hessian, jacfwd, jacrev, jvp, vjp

from helpers import call_op
from reference import keep_scale, masked_reference
from regdrop_ext import manifest

P, SEED = 0.4, dict(seed=7, offset=4)
FORWARD = manifest.ops("masked", "low_memory")


def operands(op, dtype=torch.float64, shape=(4, 6)):
    """The op's differentiable operands, by name."""
    g = torch.Generator().manual_seed(0)
    tensors = {"input": torch.randn(shape, generator=g, dtype=dtype)}
    if op.bias:
        tensors["bias"] = torch.randn(shape[-1], generator=g, dtype=dtype)
    if op.residual:
        tensors["residual"] = torch.randn(shape, generator=g, dtype=dtype)
    return tensors


def as_function(op):
    """op's output as a function of its differentiable operands, in schema order."""
    names = op.tensors

    def f(*tensors):
        named = dict(zip(names, tensors))
        return call_op(op, named.pop("input"), P, **named, **SEED)[0]

    return f


def keep_of(op, like):
    """The elements ``op`` keeps for SEED, from its own mask (the mapping is test_mapping.py's)."""
    x = torch.ones_like(like)
    zeros = torch.zeros_like(like)
    out = call_op(op, x, P, residual=zeros, bias=torch.zeros(like.shape[-1], dtype=like.dtype), **SEED)[0]
    return out != 0


@pytest.mark.parametrize("op", FORWARD, ids=lambda op: op.name)
def test_gradcheck_both_modes_and_second_order(op):
    tensors = [t.requires_grad_() for t in operands(op).values()]
    f = as_function(op)
    assert torch.autograd.gradcheck(f, tensors, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, tensors, check_fwd_over_rev=True)


@pytest.mark.parametrize("op", manifest.ops("backward", "low_memory_backward"), ids=lambda op: op.name)
def test_backward_ops_gradcheck_both_modes(op):
    forward = next(f for f in FORWARD if f.backward == op.name)
    x = torch.randn(4, 6, dtype=torch.float64)
    saved = call_op(forward, x, P, residual=torch.zeros_like(x), bias=torch.zeros(6, dtype=torch.float64), **SEED)[1]
    grad = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: op.op(g, saved, P), (grad,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lambda g: op.op(g, saved, P), (grad,), check_fwd_over_rev=True)


@pytest.mark.parametrize("op", FORWARD, ids=lambda op: op.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_jvp_is_the_mask_algebra(op, dtype):
    """jvp's tangent: mask * s * (t_input [+ t_bias]) [+ t_residual], rounded
    once to the output dtype, as the primal is; never zeros."""
    primals = operands(op, dtype)
    g = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for n, t in primals.items()}
    _, tangent = jvp(as_function(op), tuple(primals.values()), tuple(tangents.values()))
    keep = keep_of(op, primals["input"])
    expected = masked_reference(tangents["input"], keep, keep_scale(P), residual=tangents.get("residual"),
                                bias=tangents.get("bias"))
    torch.testing.assert_close(tangent, expected, rtol=0, atol=0)
    assert tangent.abs().sum() > 0


@pytest.mark.parametrize("op", FORWARD, ids=lambda op: op.name)
def test_jacfwd_equals_jacrev(op):
    primals = tuple(operands(op, shape=(3, 4)).values())
    argnums = tuple(range(len(primals)))
    forward, reverse = jacfwd(as_function(op), argnums)(*primals), jacrev(as_function(op), argnums)(*primals)
    for a, b in zip(forward, reverse):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dual_tensors_carry_tangents_through_every_op():
    for op in FORWARD:
        primals = operands(op)
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(t, torch.ones_like(t)) for n, t in primals.items()}
            out = as_function(op)(*duals.values())
            tangent = fwAD.unpack_dual(out).tangent
        assert tangent is not None, op.name
        keep = keep_of(op, primals["input"])
        ones = torch.ones_like(primals["input"])
        expected = masked_reference(ones, keep, keep_scale(P), residual=ones if op.residual else None,
                                    bias=ones[0] if op.bias else None)
        torch.testing.assert_close(tangent, expected, rtol=0, atol=0, msg=op.name)


def test_hessian_is_the_mask_on_the_diagonal():
    """The issue's case: hessian((dropout(t) ** 2).sum()) = diag(2 * keep * s^2)."""
    x = torch.randn(12, dtype=torch.float64)
    h = hessian(lambda t: (manifest.OPS["dropout"].op(t, 0.5, seed=1)[0] ** 2).sum())(x)
    keep = manifest.OPS["dropout"].op(torch.ones(12, dtype=torch.float64), 0.5, seed=1)[0] != 0
    torch.testing.assert_close(h, torch.diag(keep * (2.0 * keep_scale(0.5) ** 2)).to(torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("op", manifest.ops("in_place"), ids=lambda op: op.name)
def test_in_place_ops_update_their_tangent_in_place(op):
    shape = (4, 6, 3)
    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)

    def f(x):
        h = x * 1  # autograd refuses in-place writes to leaves
        return call_op(op, h, P, **SEED)[0]

    out, tangent = jvp(f, (x,), (t,))
    keep = out != 0
    assert torch.equal(tangent, torch.where(keep, t * keep_scale(P), 0.0))
    (cotangent,) = vjp(f, x)[1](torch.ones(shape, dtype=torch.float64))
    assert torch.equal(cotangent, keep * torch.tensor(keep_scale(P), dtype=torch.float64))


def test_tangents_of_mixed_dtypes_come_in_the_output_dtype():
    """A bfloat16 input under a float32 residual (autocast's mix): the output
    and its tangent are float32."""
    x, r = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8)
    _, tangent = jvp(lambda a, b: manifest.OPS["dropout_add"].op(a, b, P, **SEED)[0], (x, r),
                     (torch.ones_like(x), torch.zeros_like(r)))
    assert tangent.dtype == torch.float32
    keep = manifest.OPS["dropout_add"].op(torch.ones_like(x), torch.zeros_like(r), P, **SEED)[0] != 0
    assert torch.equal(tangent, torch.where(keep, keep_scale(P), 0.0))
