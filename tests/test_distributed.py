"""regdrop_ext under torch.distributed: DistributedDataParallel on two CPU
processes (gloo, a file store in tmp_path, loopback only), per-rank seeds
and a shared random state."""

import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import regdrop_ext

WORLD_SIZE = 2


def all_equal(t: torch.Tensor) -> bool:
    """Whether every rank holds the same ``t``."""
    gathered = [torch.empty_like(t) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def mask() -> torch.Tensor:
    """4096 dropout draws: two ranks agree on all of them with probability 2^-4096."""
    return regdrop_ext.dropout(torch.ones(4096), 0.5) != 0


def train_and_check(rank: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(rank)  # different initializations: DDP must broadcast rank 0's
        model = nn.Sequential(
            nn.Linear(8, 64), nn.ReLU(), regdrop_ext.Dropout(0.2), regdrop_ext.DropPath(0.1), nn.Linear(64, 1)
        )
        model = nn.parallel.DistributedDataParallel(model)
        regdrop_ext.seed_ranks(1234)
        assert not all_equal(mask()), "ranks seeded through seed_ranks drew the same mask"

        shared = regdrop_ext.SharedRandomState(99)
        with shared:
            first = mask()
        with shared:
            second = mask()
        assert all_equal(first) and all_equal(second), "masks under a shared seed differ across ranks"
        assert not torch.equal(first, second), "the shared stream did not move on"

        data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of one task
        x = torch.randn(256, 8, generator=data)
        y = x @ torch.linspace(-1, 1, 8).unsqueeze(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        for _ in range(60):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        for parameter in model.parameters():
            assert all_equal(parameter.detach()), "parameters differ across ranks"
        # Noisy per step (dropout): compare the means of the first and last ten.
        assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), f"loss did not go down: {losses}"
    finally:
        dist.destroy_process_group()
        time.sleep(0.1)  # gloo's threads free the last tensors first: see examples/ddp_train.py


def test_ddp_trains_in_sync_with_per_rank_masks(tmp_path):
    mp.spawn(train_and_check, args=(str(tmp_path / "store"),), nprocs=WORLD_SIZE)


# --- SharedRandomState within one process -----------------------------------------


def test_shared_state_leaves_the_own_stream_as_if_nothing_was_drawn():
    torch.manual_seed(3)
    expected = mask()
    torch.manual_seed(3)
    shared = regdrop_ext.SharedRandomState(7)
    with shared:
        mask()
    assert torch.equal(mask(), expected)


def test_shared_state_replays_from_its_seed_and_moves_on():
    first, second = regdrop_ext.SharedRandomState(7), regdrop_ext.SharedRandomState(7)
    with first:
        a = mask()
    with first:
        b = mask()
    with second:
        assert torch.equal(mask(), a)
    assert not torch.equal(a, b)
