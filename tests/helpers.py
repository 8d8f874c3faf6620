"""Helpers shared by the test modules (test modules never import each other)."""

import math

import torch


def nonzero_input(shape, dtype, device):
    """Values in [0.5, 1.5) with random signs: never 0, so a zero output means dropped."""
    x = torch.rand(shape, device=device) + 0.5
    sign = torch.randint(0, 2, shape, device=device) * 2 - 1
    return (x * sign).to(dtype)


def binomial_bounds(n, q, sigmas=5.0):
    """The range of a Binomial(n, q) count within `sigmas` standard deviations of its mean."""
    mean, sd = n * q, math.sqrt(n * q * (1 - q))
    return mean - sigmas * sd, mean + sigmas * sd


def in_place(name, x, *args, **kwargs):
    """The in-place op ``name`` on ``x``, with a mask to write: (x, mask)."""
    from regdrop_ext import manifest

    op = manifest.OPS[name]
    return op.op(x, op.new_mask(x), *args, **kwargs)


def call_op(op, x, p, residual=None, bias=None, **kwargs):
    """Forward op ``op`` (a regdrop_ext.manifest.Op) on ``x``: with the
    residual and bias it takes, and a mask to write if it is in place."""
    bound = {"input": x, "p": p, **kwargs}
    if op.residual:
        bound["residual"] = residual
    if op.bias:
        bound["bias"] = bias
    if op.variant == "in_place":
        bound["mask"] = op.new_mask(x)
    return op.call(bound)
