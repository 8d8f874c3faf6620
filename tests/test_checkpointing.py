"""Activation checkpointing (torch.utils.checkpoint) over regdrop_ext layers.

A checkpointed block runs its forward twice: once without saving activations,
and again in backward to rebuild them. The masks drawn the second time must be
the masks of the first, or the gradients belong to another network than the
output. torch restores the generators' states before recomputing
(preserve_rng_state=True, the default); on the CPU every regdrop call takes a
fresh seed from the default generator, so the replay redraws the same masks.

Every test here compares, bit for bit (torch.equal), a checkpointed
forward+backward with an unchecked one from the same generator state. The
sanity tests show that these comparisons can fail: with preserve_rng_state=False
the recomputation draws new masks, and the gradients differ.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import regdrop_ext
from blocks import BATCH, P, TOKENS, WIDTH, TransformerBlock

SEED = 1234  # the default generator's seed before each forward+backward
DTYPES = [torch.float32, torch.bfloat16]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- blocks: each takes one (BATCH, TOKENS, WIDTH) tensor ------------------------


class Unary(nn.Module):
    """``layer(gelu(fc(x)))``, for the single-input layers."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.layer = layer

    def forward(self, x):
        return self.layer(F.gelu(self.fc(x)))


class Residual(nn.Module):
    """``layer(fc(x), x)``, for the residual forms ``forward(input, residual)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.layer = layer

    def forward(self, x):
        return self.layer(self.fc(x), x)


class BiasResidual(nn.Module):
    """``layer(x @ W^T, bias, x)``: a linear layer whose bias add is deferred into the layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)
        self.bias = nn.Parameter(torch.randn(WIDTH))
        self.layer = layer

    def forward(self, x):
        return self.layer(F.linear(x, self.weight), self.bias, x)


class Channels(nn.Module):
    """``fc(x)`` viewed as (N, C, H, W) = (BATCH, TOKENS, 4, WIDTH / 4), through a channel dropout."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.layer = layer

    def forward(self, x):
        return self.layer(self.fc(x).unflatten(-1, (4, WIDTH // 4))).flatten(-2)


BLOCKS = {
    "Dropout": lambda: Unary(regdrop_ext.Dropout(P)),
    "Dropout-low_memory": lambda: Unary(regdrop_ext.Dropout(P, low_memory=True)),
    "Dropout-inplace": lambda: Unary(regdrop_ext.Dropout(P, inplace=True)),
    "DropoutAdd": lambda: Residual(regdrop_ext.DropoutAdd(P)),
    "DropoutAdd-low_memory": lambda: Residual(regdrop_ext.DropoutAdd(P, low_memory=True)),
    "BiasDropoutAdd": lambda: BiasResidual(regdrop_ext.BiasDropoutAdd(P)),
    "DropPath": lambda: Unary(regdrop_ext.DropPath(P)),
    "DropPathAdd": lambda: Residual(regdrop_ext.DropPathAdd(P)),
    "Dropout2d": lambda: Channels(regdrop_ext.Dropout2d(P)),
    "transformer": TransformerBlock,
}


def build(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return BLOCKS[name]().to(dtype).train()


def inputs(dtype: torch.dtype):
    """The block's input and the gradient fed to its output, from their own generator."""
    data = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=data).to(dtype)
    grad_out = torch.randn(BATCH, TOKENS, WIDTH, generator=data).to(dtype)
    return x, grad_out


def forward_backward(module: nn.Module, run, dtype: torch.dtype):
    """One forward+backward from the default generator seeded with SEED.

    Returns the output, every gradient (the input's and each parameter's, by
    name) and the default generator's state afterwards."""
    x0, grad_out = inputs(dtype)
    module.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    torch.manual_seed(SEED)
    out = run(module, x)
    out.backward(grad_out)
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads, torch.get_rng_state()


def assert_same_run(expected, actual):
    """Outputs, every gradient and the generator state afterwards equal bit for bit."""
    (out_e, grads_e, rng_e), (out_a, grads_a, rng_a) = expected, actual
    assert torch.equal(out_a, out_e), "outputs differ"
    assert grads_a.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        assert grad is not None, f"{name}: no gradient in the unchecked run"
        assert grads_a[name] is not None, f"{name}: no gradient in the checkpointed run"
        assert grads_a[name].dtype == grad.dtype
        assert torch.equal(grads_a[name], grad), f"gradient of {name} differs"
    assert torch.equal(rng_a, rng_e), "the default generator ends elsewhere than after the unchecked run"


def unchecked(module, x):
    return module(x)


def checkpointed(use_reentrant: bool, preserve_rng_state: bool = True):
    def run(module, x):
        return checkpoint(module, x, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state)

    return run


REENTRANT = pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])


# --- tests ------------------------------------------------------------------------


@REENTRANT
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block", list(BLOCKS))
def test_checkpoint_reproduces_unchecked_run_bit_for_bit(block, dtype, use_reentrant):
    """checkpoint(block) gives the unchecked block's output and the same
    gradients for the input and every parameter, bit for bit: the
    recomputation in backward redraws exactly the forward's masks. Afterwards
    the default generator is where the unchecked run leaves it, so later masks
    do not shift either."""
    module = build(block, dtype)
    expected = forward_backward(module, unchecked, dtype)
    actual = forward_backward(module, checkpointed(use_reentrant), dtype)
    assert_same_run(expected, actual)


@REENTRANT
@pytest.mark.parametrize("block", list(BLOCKS))
def test_recomputation_from_another_generator_state_changes_gradients(block, use_reentrant):
    """Sanity check of the test above: with preserve_rng_state=False the
    recomputation draws fresh masks (at p = 0.5, over at least 32 units), so
    the forward output is unchanged but the input's gradient differs. The
    bit-for-bit equality above therefore proves that the masks were redrawn
    identically, not that they do not matter."""
    module = build(block, torch.float32)
    expected_out, expected_grads, _ = forward_backward(module, unchecked, torch.float32)
    out, grads, _ = forward_backward(module, checkpointed(use_reentrant, preserve_rng_state=False), torch.float32)
    assert torch.equal(out, expected_out), "the forward pass itself should be unchanged"
    assert not torch.equal(grads["input"], expected_grads["input"]), (
        "the recomputation drew the forward's masks although the generator state was not restored"
    )


class Stack(nn.Sequential):
    """Four blocks, each its own checkpointed segment under checkpoint_sequential."""

    def __init__(self) -> None:
        super().__init__(
            TransformerBlock(),
            Residual(regdrop_ext.DropoutAdd(P)),
            TransformerBlock(),
            Unary(regdrop_ext.Dropout(P, low_memory=True)),
        )


@REENTRANT
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_checkpoint_sequential_reproduces_unchecked_run_bit_for_bit(dtype, use_reentrant):
    """checkpoint_sequential over four blocks in four segments: backward
    recomputes the segments last to first, each from its own forward-time
    generator state, and gets every mask of the unchecked run."""
    torch.manual_seed(0)
    module = Stack().to(dtype).train()

    def run(module, x):
        return checkpoint_sequential(module, 4, x, use_reentrant=use_reentrant)

    assert_same_run(forward_backward(module, unchecked, dtype), forward_backward(module, run, dtype))


@REENTRANT
def test_checkpoint_sequential_without_preserved_rng_state_changes_gradients(use_reentrant):
    """Sanity check of the test above: without restored generator states the
    segments' recomputations draw new masks and the gradients differ."""
    torch.manual_seed(0)
    module = Stack().train()

    def run(module, x):
        return checkpoint_sequential(module, 4, x, use_reentrant=use_reentrant, preserve_rng_state=False)

    expected_out, expected_grads, _ = forward_backward(module, unchecked, torch.float32)
    out, grads, _ = forward_backward(module, run, torch.float32)
    assert torch.equal(out, expected_out)
    assert not torch.equal(grads["input"], expected_grads["input"])
