"""Dropout under torch.distributed: which ranks draw the same masks.

DistributedDataParallel broadcasts rank 0's parameters and averages the
gradients, but leaves the random generators alone. Ranks seeded alike drop
the same units of their different batches, so the global batch sees only one
rank's worth of distinct masks: seed each rank differently
(:func:`seed_ranks`). Regions whose masks must match across ranks (a
replicated activation in a tensor-parallel layer) draw from a
:class:`SharedRandomState` instead.
"""

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["SharedRandomState", "seed_ranks"]


def seed_ranks(base_seed: int, *, group: Optional["dist.ProcessGroup"] = None) -> int:
    """Seed this rank's default generators (CPU and every CUDA device) with
    ``base_seed + rank``, so that no two ranks draw the same masks.

    Call it after wrapping the model in DistributedDataParallel: the
    initialization then comes from the common seed, and the broadcast of rank
    0's parameters changes nothing.

    Args:
        base_seed: the same on every rank.
        group: the process group whose rank is added. Default: the world.

    Returns:
        The seed of this rank.
    """
    seed = base_seed + dist.get_rank(group)
    torch.manual_seed(seed)
    return seed


class SharedRandomState:
    """A random stream that every rank holds alike, for masks that must be
    identical across ranks.

    Inside ``with shared:`` the default generators of the CPU and of the
    current CUDA device draw from the shared stream. On exit the shared stream
    keeps its position (the next block draws new masks) and the rank's own
    generators get their states back, as if the block had drawn nothing.
    Blocks do not nest.

    Args:
        seed: the same on every rank.
    """

    def __init__(self, seed: int) -> None:
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None
        own = self._states()
        torch.default_generator.manual_seed(seed)
        if self._cuda_device is not None:
            torch.cuda.default_generators[self._cuda_device].manual_seed(seed)
        self._shared = self._states()
        self._load(own)

    def _states(self):
        cuda = None if self._cuda_device is None else torch.cuda.get_rng_state(self._cuda_device)
        return torch.get_rng_state(), cuda

    def _load(self, states) -> None:
        cpu, cuda = states
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self._cuda_device)

    def __enter__(self) -> "SharedRandomState":
        self._own = self._states()
        self._load(self._shared)
        return self

    def __exit__(self, *exc_info) -> None:
        self._shared = self._states()
        self._load(self._own)
