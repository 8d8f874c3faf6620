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

    The CUDA device is the one current when a block is entered, not when the
    object is made: one built before ``torch.cuda.set_device(local_rank)``
    still draws on the rank's own device. Each device gets its shared stream
    from ``seed`` on its first block.

    Args:
        seed: the same on every rank.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        own = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        self._shared_cpu = torch.get_rng_state()
        torch.set_rng_state(own)
        self._shared_cuda = {}  # device index -> state, from its first block on
        self._entered = None

    def _shared_cuda_state(self, device: int) -> torch.Tensor:
        if device not in self._shared_cuda:
            generator = torch.cuda.default_generators[device]
            own = generator.get_state()
            generator.manual_seed(self.seed)
            self._shared_cuda[device] = generator.get_state()
            generator.set_state(own)
        return self._shared_cuda[device]

    def __enter__(self) -> "SharedRandomState":
        if self._entered is not None:
            raise RuntimeError("SharedRandomState blocks do not nest")
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        own_cuda = None if device is None else torch.cuda.get_rng_state(device)
        self._entered = (device, torch.get_rng_state(), own_cuda)
        torch.set_rng_state(self._shared_cpu)
        if device is not None:
            torch.cuda.set_rng_state(self._shared_cuda_state(device), device)
        return self

    def __exit__(self, *exc_info) -> None:
        device, own_cpu, own_cuda = self._entered
        self._entered = None
        self._shared_cpu = torch.get_rng_state()
        torch.set_rng_state(own_cpu)
        if device is not None:
            self._shared_cuda[device] = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(own_cuda, device)
