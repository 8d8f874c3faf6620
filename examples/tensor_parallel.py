"""Tensor parallelism with regdrop_ext's dropout on DTensors.

A transformer block (attention and MLP) is split over the ranks as Megatron-LM
splits it, with torch.distributed.tensor.parallel: q, k, v and fc1
column-parallel, the attention projection and fc2 row-parallel, and the
LayerNorms and the residual dropouts on the sequence-sharded activation
(SequenceParallel). Every dropout gets a DTensor: the attention dropout the
head-sharded probabilities, the MLP dropout the column-sharded hidden
activation, the residual ones the sequence-sharded output. Each rank draws
its shard's part of the mask that the whole tensor would get, so the sharded
block trains as the same block in one process with the same seed, up to the
order of the sums in the sharded matmuls.

At the end, one training step of the block is timed against the same block
with torch.nn.Dropout (DTensor's own dropout).

    python examples/tensor_parallel.py [--quick]     # starts 2 CPU processes (gloo)
    torchrun --nproc_per_node=2 examples/tensor_parallel.py [--quick]
"""

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

import regdrop_ext


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_drop = dropout
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # the global shape, for a DTensor
        split = lambda t: t.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = self.attn_drop((q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, dropout: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), dropout, nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, p: float, dropout=regdrop_ext.Dropout) -> None:
        super().__init__()
        self.norm1, self.attn, self.drop1 = nn.LayerNorm(dim), Attention(dim, heads, dropout(p)), dropout(p)
        self.norm2, self.mlp, self.drop2 = nn.LayerNorm(dim), Mlp(dim, dropout(p)), dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.norm1(x)))
        return x + self.drop2(self.mlp(self.norm2(x)))


def tensor_parallel(block: Block, mesh) -> Block:
    """Activations between the sublayers sharded along the sequence (dim 1);
    inside them, along the heads and the hidden units. Outputs stay DTensors."""
    sequence = Shard(1)
    return parallelize_module(block, mesh, {
        "norm1": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(sequence,), desired_input_layouts=(Replicate(),)),
        "attn.q": ColwiseParallel(use_local_output=False),
        "attn.k": ColwiseParallel(use_local_output=False),
        "attn.v": ColwiseParallel(use_local_output=False),
        "attn.proj": RowwiseParallel(output_layouts=sequence, use_local_output=False),
        "drop1": SequenceParallel(),
        "norm2": SequenceParallel(),
        "mlp.fc1": ColwiseParallel(input_layouts=sequence, use_local_output=False),
        "mlp.fc2": RowwiseParallel(output_layouts=sequence, use_local_output=False),
        "drop2": SequenceParallel(),
    })  # fmt: skip


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Not nn.functional.mse_loss: on sharded DTensors, torch 2.13 gives its input a gradient
    # world_size times too large (with or without dropout in the model).
    loss = ((out - target) ** 2).mean()
    return loss.full_tensor() if isinstance(loss, DTensor) else loss  # a plain scalar, the same on every rank


def train(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int) -> list:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1)  # the same seed on every rank: DTensor ops need the ranks' generators in step
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = mse(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def median_step_ms(models: list, x: torch.Tensor, target: torch.Tensor, warmup: int, repeats: int) -> list:
    """Each model's median time of one training step; the models take turns, so that
    a machine that slows down or speeds up meanwhile does so for all of them."""
    optimizers = [torch.optim.SGD(model.parameters(), lr=1e-3) for model in models]
    times = [[] for _ in models]
    for step in range(warmup + repeats):
        for model, optimizer, kept in zip(models, optimizers, times):
            dist.barrier()  # every rank starts together; the step's collectives keep them together
            start = time.perf_counter()
            optimizer.zero_grad()
            mse(model(x), target).backward()
            optimizer.step()
            if step >= warmup:
                kept.append(time.perf_counter() - start)
    return [1000 * statistics.median(kept) for kept in times]


def run(args) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # DTensor's own dropout warns that its random ops on CPU meshes may be incomplete: it is only timed here.
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    dim, heads, tokens, batch, steps, repeats = (64, 4, 32, 4, 4, 10) if args.quick else (256, 8, 128, 8, 10, 20)
    mesh = init_device_mesh("cpu", (world_size,))

    torch.manual_seed(0)
    block = Block(dim, heads, p=0.1)
    one_process = copy.deepcopy(block)
    block = tensor_parallel(block, mesh)
    data = torch.Generator().manual_seed(2)
    x, target = torch.randn(batch, tokens, dim, generator=data), torch.randn(batch, tokens, dim, generator=data)
    sharded_x, sharded_target = (distribute_tensor(t, mesh, [Shard(1)]) for t in (x, target))

    losses = train(block, sharded_x, sharded_target, steps)
    if rank == 0:
        for step, loss in enumerate(losses):
            print(f"step {step}  loss {loss:.6f}")
    expected = train(one_process, x, target, steps)  # every rank, so that all generators move alike
    difference = max(abs(a - b) / abs(b) for a, b in zip(losses, expected))
    if rank == 0:
        same = difference < 1e-5
        print(f"{world_size} ranks; losses as the same block's on one process: {same} "
              f"(largest relative difference {difference:.1e})")  # fmt: skip

    torch.manual_seed(0)
    native = tensor_parallel(Block(dim, heads, p=0.1, dropout=nn.Dropout), mesh)
    warmup = 3 if args.quick else 5
    ours, theirs = median_step_ms([block, native], sharded_x, sharded_target, warmup, repeats)
    if rank == 0:
        print(f"one training step (forward, backward, SGD), median of {repeats}: regdrop_ext {ours:.2f} ms, "
              f"torch.nn.Dropout {theirs:.2f} ms, ratio {theirs / ours:.2f} (>1: regdrop_ext faster)")  # fmt: skip


def process(rank: int, world_size: int, store: str, args) -> None:
    """One rank; with a store given, it joins the group of the processes spawned by main()."""
    if store:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    else:
        dist.init_process_group("gloo")  # under torchrun
    try:
        run(args)
    finally:
        dist.destroy_process_group()
        time.sleep(0.1)  # gloo's threads free the last tensors first: see examples/ddp_train.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small block, a few steps")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        process(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "", args)
        return
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(process, args=(2, os.path.join(folder, "store"), args), nprocs=2)


if __name__ == "__main__":
    main()
