"""Train a small model with regdrop_ext layers under DistributedDataParallel.

NCCL on GPUs (one per process), gloo on CPUs. Each rank draws its own masks
(regdrop_ext.seed_ranks); a SharedRandomState draws masks that every rank
shares, as a tensor-parallel region would need.

    torchrun --nproc_per_node=2 examples/ddp_train.py [--quick]
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import regdrop_ext


def train(args, device: torch.device) -> bool:
    """Train; return whether every rank ended with the same parameters."""
    rank, world_size, cuda = dist.get_rank(), dist.get_world_size(), device.type == "cuda"
    steps = 20 if args.quick else 500
    torch.manual_seed(args.seed)  # one initialization (DDP broadcasts rank 0's anyway)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), regdrop_ext.Dropout(0.1),
        nn.Linear(256, 256), nn.GELU(), regdrop_ext.Dropout(0.1),
        nn.Linear(256, 1),
    ).to(device)  # fmt: skip
    model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    regdrop_ext.seed_ranks(args.seed)  # from here on, each rank its own masks

    # A fixed task; each rank draws its own batches of it.
    task = torch.randn(32, 1, generator=torch.Generator().manual_seed(args.seed)).to(device) / 32**0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        x = torch.randn(128, 32, device=device)
        loss = nn.functional.mse_loss(model(x), torch.sin(x @ task))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            loss = loss.detach()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            if rank == 0:
                print(f"step {step:4d}  loss {loss.item():.4f}")

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    largest, smallest = flat.clone(), flat.clone()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    in_sync = torch.equal(largest, smallest)
    own = regdrop_ext.dropout(torch.ones(1024, device=device), 0.5)
    with regdrop_ext.SharedRandomState(args.seed):
        shared = regdrop_ext.dropout(torch.ones(1024, device=device), 0.5)
    masks = [torch.empty(2, 1024, device=device) for _ in range(world_size)]
    dist.all_gather(masks, torch.stack([own, shared]))
    if rank == 0:
        print(f"{world_size} ranks on {device.type}, {dist.get_backend()}; parameters in sync: {in_sync}")
        print(f"own masks identical across ranks: {all(torch.equal(m[0], masks[0][0]) for m in masks)}")
        print(f"shared masks identical across ranks: {all(torch.equal(m[1], masks[0][1]) for m in masks)}")
    return in_sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        in_sync = train(args, device)
    finally:
        dist.destroy_process_group()
        # With DDP the gloo group outlives destroy_process_group (torch 2.13), and
        # its worker threads free each collective's tensors after the caller moves
        # on; that takes the GIL, and aborts the process if the interpreter is
        # already shutting down (see pytorch/pytorch#179291). Let them finish.
        time.sleep(0.1)
    if not in_sync:
        raise SystemExit("parameters differ across ranks")


if __name__ == "__main__":
    main()
