"""regdrop_ext under FSDP2 (torch.distributed.fsdp.fully_shard) on two CPU
processes (gloo, a file store in tmp_path, loopback only), against the same
training run under DistributedDataParallel.

Sharding changes where parameters live, not what a rank computes: each rank
all-gathers its blocks' parameters before their forward and draws its masks
from its own default generator, as under DDP. So with the same initial
parameters, the same per-rank data and the same per-rank seeds, the two runs
draw the same masks at every step and follow the same loss curve; only the
gradient reduction (reduce-scatter vs all-reduce) may round differently.
"""

import time
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

import regdrop_ext
from helpers import spawn_ranks

pytestmark = pytest.mark.slow  # other processes: started first (conftest.py)

WORLD_SIZE = 2
STEPS = 5
BATCH, TOKENS, IN, WIDTH, OUT = 8, 16, 12, 32, 4
P, DROP_PATH = 0.25, 0.25
# Losses and parameters after STEPS SGD steps, float32. The gradient
# reductions differ (FSDP2 reduce-scatters, DDP all-reduces, each with its own
# division by the world size), so equality is not guaranteed; with 2 ranks
# (a two-term sum commutes, halving is exact) the runs are observed to be
# bit-identical. The bounds allow a few ulp (float32 ulp at 1: 1.2e-7).
LOSS_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}
PARAM_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}


class Block(nn.Module):
    """A pre-norm ViT block: attention (qkv Linear, dropout on the attention
    probabilities), bias-dropout-add after the projection, an MLP with
    low-memory dropout, and a residual form given by ``residual``."""

    def __init__(self, residual: nn.Module, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.attn_drop = regdrop_ext.Dropout(P)
        self.proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.proj_bias = nn.Parameter(torch.zeros(WIDTH))
        self.proj_drop_add = regdrop_ext.BiasDropoutAdd(P)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 4 * WIDTH)
        self.mlp_drop = regdrop_ext.Dropout(P, low_memory=True)
        self.fc2 = nn.Linear(4 * WIDTH, WIDTH)
        self.residual = residual
        self.checkpointed = False  # run under non-reentrant activation checkpointing

    def forward(self, x):
        if self.checkpointed:
            return checkpoint(self.body, x, use_reentrant=False)
        return self.body(x)

    def body(self, x):
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        weights = self.attn_drop((q @ k.transpose(-2, -1) * q.size(-1) ** -0.5).softmax(-1))
        attended = (weights @ v).transpose(1, 2).flatten(-2)
        x = self.proj_drop_add(self.proj(attended), self.proj_bias, x)
        return self.residual(self.fc2(self.mlp_drop(F.gelu(self.fc1(self.norm2(x))))), x)


class TinyViT(nn.Module):
    """Token embedding with dropout, two blocks (one with drop-path-add, one
    with dropout-add on the MLP residual), mean pooling, drop-path, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, WIDTH)
        self.pos = nn.Parameter(torch.randn(TOKENS, WIDTH) * 0.02)
        self.pos_drop = regdrop_ext.Dropout(P)
        self.blocks = nn.ModuleList(
            [Block(regdrop_ext.DropPathAdd(DROP_PATH)), Block(regdrop_ext.DropoutAdd(P))]
        )
        self.norm = nn.LayerNorm(WIDTH)
        self.head_drop = regdrop_ext.DropPath(DROP_PATH)
        self.head = nn.Linear(WIDTH, OUT)

    def forward(self, x):
        h = self.pos_drop(self.embed(x) + self.pos)
        for block in self.blocks:
            h = block(h)
        return self.head(self.head_drop(self.norm(h).mean(1)))


def build() -> TinyViT:
    """The same initial parameters on every rank and in both runs."""
    torch.manual_seed(0)
    return TinyViT().train()


def full_parameters(model: nn.Module):
    """Parameters by name, unsharded (a collective for FSDP2's DTensors), as the unwrapped model names them."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


class Run(NamedTuple):
    losses: torch.Tensor
    first_output: torch.Tensor  # before any update
    saved: list  # per step, what the random ops saved for backward: the uint8 masks and
    # the int64 (seed, offset) states of low-memory dropout, in the order saved
    params: dict  # the final parameters by name, unsharded


def train(model: nn.Module, rank: int, x: torch.Tensor, y: torch.Tensor) -> Run:
    """STEPS SGD steps from the default generator seeded with 1000 + rank."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, saved_per_step, first_output = [], [], None
    torch.manual_seed(1000 + rank)
    for _ in range(STEPS):
        saved = []

        def pack(t):
            if t.dtype in (torch.uint8, torch.int64):
                saved.append(t.detach().clone())
            return t

        optimizer.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        loss = F.mse_loss(out, y)
        loss.backward()
        optimizer.step()
        if first_output is None:
            first_output = out.detach().clone()
        losses.append(loss.detach())
        saved_per_step.append(saved)
    return Run(torch.stack(losses), first_output, saved_per_step, full_parameters(model))


def check_against(ddp_run: Run, fsdp_run: Run, checkpoint_blocks: bool) -> None:
    """One FSDP2 run against the DDP run: the same draws, outputs, losses and parameters."""
    how = "FSDP2 with checkpointed blocks" if checkpoint_blocks else "FSDP2"
    # The same draws: every mask and rng state saved for backward, at every step.
    for step, (expected, actual) in enumerate(zip(ddp_run.saved, fsdp_run.saved)):
        # pos_drop, head_drop, and per block attn_drop, proj_drop_add, residual: 8
        # masks; per block mlp_drop (low memory): 2 rng states.
        kinds = sorted(str(t.dtype) for t in expected)
        assert kinds == ["torch.int64"] * 2 + ["torch.uint8"] * 8, f"step {step}: saved {kinds}"
        if checkpoint_blocks:
            # Checkpoint's own saved-tensor hooks take what the blocks save
            # (recomputed in backward); pos_drop's and head_drop's masks remain.
            expected = [expected[0], expected[-1]]
        assert len(actual) == len(expected), f"{how}, step {step}: saved {len(actual)} random states, DDP {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert e.dtype == a.dtype and torch.equal(e, a), f"{how}, step {step}: random op {i} drew differently"
    # Before any update the parameters are equal, so the outputs are too.
    assert torch.equal(fsdp_run.first_output, ddp_run.first_output), f"{how}: first-step outputs differ"
    torch.testing.assert_close(fsdp_run.losses, ddp_run.losses, **LOSS_TOLERANCE)
    assert fsdp_run.params.keys() == ddp_run.params.keys()
    for name, expected in ddp_run.params.items():
        torch.testing.assert_close(fsdp_run.params[name], expected, **PARAM_TOLERANCE, msg=lambda m: f"{how}, {name}: {m}")


def fsdp_against_ddp(rank: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
        x = torch.randn(BATCH, TOKENS, IN, generator=data)
        y = torch.randn(BATCH, OUT, generator=data)

        ddp = nn.parallel.DistributedDataParallel(build())
        ddp_run = train(ddp, rank, x, y)
        assert not torch.equal(ddp_run.params["head.weight"], build().head.weight), "training did not update the head"

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for checkpoint_blocks in (False, True):
            fsdp = build()
            for block in fsdp.blocks:
                block.checkpointed = checkpoint_blocks
                fully_shard(block, mesh=mesh)
            fully_shard(fsdp, mesh=mesh)
            assert all(isinstance(p, DTensor) for p in fsdp.parameters()), "fully_shard left parameters unsharded"
            check_against(ddp_run, train(fsdp, rank, x, y), checkpoint_blocks)

        # Ranks seeded 1000 + rank drew different masks (probability of a match: 2^-1000s).
        first_mask = ddp_run.saved[0][0]
        gathered = [torch.empty_like(first_mask) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, first_mask)
        assert not torch.equal(gathered[0], gathered[1]), "both ranks drew the same mask"
    finally:
        dist.destroy_process_group()
        time.sleep(0.1)  # gloo's threads free the last tensors first: see examples/ddp_train.py


def test_fsdp2_draws_ddps_masks_and_follows_its_losses(tmp_path):
    """FSDP2 (fully_shard per block and at the root, a CPU device mesh) and DDP
    train the same TinyViT for STEPS SGD steps on 2 gloo ranks from the same
    parameters, data and per-rank seeds. Guarantees: every mask and low-memory
    rng state saved for backward is bit-identical between the runs at every
    step, the first step's outputs are bit-identical, the losses and final
    parameters agree within a few float32 ulp (LOSS_TOLERANCE, PARAM_TOLERANCE),
    and the two ranks draw different masks.

    Then again with each FSDP2 block under non-reentrant activation
    checkpointing (the usual pairing at scale): backward all-gathers a block's
    parameters again and recomputes its forward, redrawing its masks from the
    restored generator state. The masks outside the blocks, the first step's
    outputs, the losses and the final parameters match the DDP run without
    checkpointing; a recomputation that drew other masks would give other
    gradients, hence other parameters and losses after the first step.
    Both FSDP2 runs are checked in one spawn, against one DDP run."""
    spawn_ranks(fsdp_against_ddp, (str(tmp_path / "store"),), WORLD_SIZE)
