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
