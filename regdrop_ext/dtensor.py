"""The regdrop ops on DTensors: each shard draws its part of the whole tensor's mask.

A random op on a DTensor runs once per rank, on the rank's local tensor, and
passes the op ``shard=(first, run, stride)``: where the local units lie among
the units of the whole (global) tensor, numbered as the op numbers them
(csrc/schemas.h) in a contiguous tensor, as ``full_tensor()`` returns it:
element units row-major, whatever the shards' strides. The counter-based
mapping draws every unit from its own Philox counter, so the shards together
draw exactly what one call on the whole tensor draws, for any placement and
any number of ranks: the mask does not depend on the sharding. A replicated
tensor is a shard of itself, so every rank draws the same mask.

The ops are registered as DTensor custom-op handlers, not through
``register_sharding``: a sharding strategy runs the op on every shard with
the same arguments, and here each shard needs its own ``shard``.

Placements. ``Shard(d)`` on any dim and ``Replicate`` run as they are, on
meshes of any dimension, as long as the local units form one run per row of
the global tensor (all but: element ops sharded along two dims that are not
the leading one and the last sharded one). Other layouts (``Partial``
inputs, ``_StridedShard``, those two-dim element shardings) are first
redistributed (``Partial`` to ``Replicate``; the other to ``Replicate``
along the offending mesh dims), and the output goes back to the input's
placements. Drop-path keeps one unit per sample and channel dropout one per
(n, c), whatever the sharding.

Masks. A DTensor op's mask (or a low-memory op's rng_state) is the
per-shard data its backward needs: a DTensor of shape ``(*grid, bytes)``,
``grid[d]`` the number of shards along tensor dim ``d``, with the input's
placements; each rank holds its shard's mask, zero-padded to the largest
shard's. Backward ops read the placements there, bring ``grad`` to them, and
shard the gradient again where ``grad`` was sharded and the mask is not.

Random streams. With ``seed=``, every rank draws (seed, offset). From a
generator, ranks must hold generators in the same state, as DTensor's own
random ops require: the first such call on a mesh gives every rank of the
mesh the default generator state of the mesh's first rank, once (all ranks
warn when states differed); later calls need no collective, since each call
advances every rank's generator alike (one draw per call, whatever the
shard's size; none for a tensor without units, as on the whole tensor).
Call ``torch.manual_seed`` with the same seed on every rank.
"""

import importlib.abc
import importlib.util
import math
import sys
import warnings
from typing import Optional

import torch

from .manifest import CHANNEL, ELEMENT, SAMPLE
from . import manifest


# --- where a block's units lie among the global tensor's -------------------------


def _row_major_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def unit_shard(global_shape, offsets, local_shape, unit: str) -> Optional[tuple]:
    """``(first, run, stride)`` of the block of a tensor of ``global_shape``
    that starts at ``offsets`` and has ``local_shape``: its units, numbered
    in the block as the ops number them, are the global tensor's units
    ``first + (i // run) * stride + i % run``. None when no one (run, stride)
    places them (element units along two non-leading sharded dims)."""
    global_shape, offsets, local_shape = list(global_shape), list(offsets), list(local_shape)
    if unit == SAMPLE:
        return (offsets[0], max(local_shape[0], 1), max(local_shape[0], 1))
    if unit == CHANNEL:
        channels = global_shape[1]
        return (offsets[0] * channels + offsets[1], max(local_shape[1], 1), max(channels, local_shape[1], 1))
    if math.prod(local_shape) == 0:
        return (0, 1, 1)
    strides = _row_major_strides(global_shape)
    first = sum(o * s for o, s in zip(offsets, strides))
    partial = [d for d, (l, g) in enumerate(zip(local_shape, global_shape)) if l < g]
    if not partial:
        return (first, math.prod(local_shape), math.prod(local_shape))
    last = partial[-1]
    run = local_shape[last] * strides[last]
    # Each index of the dims before `last` that the block spans is a run. The
    # runs are evenly spaced when each of those dims but the first is whole,
    # with only dims of size 1 before it back to the previous one.
    rows = [d for d in range(last) if local_shape[d] > 1]
    for a, b in zip(rows, rows[1:]):
        if local_shape[b] < global_shape[b] or any(global_shape[d] > 1 for d in range(a + 1, b)):
            return None
    return (first, run, strides[rows[-1]] if rows else run)


# --- placements --------------------------------------------------------------------


def _placement_types():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Shard, Replicate, Partial


def _is_plain_shard(p) -> bool:
    Shard, _, _ = _placement_types()
    return type(p) is Shard  # not _StridedShard, a subclass of Shard in some torch versions


def _is_linear_partial(p) -> bool:
    return p.is_partial() and p.reduce_op in ("sum", "avg")


def _effective_placements(placements, global_shape, unit: str, keep_linear_partial: bool = False):
    """The placements the op runs on: the input's, with Partial and
    _StridedShard replicated and, for element units, only two dims sharded:
    the last sharded one and the leading one (the first longer than 1), so
    that the dims between them are whole and unit_shard places every shard.
    ``keep_linear_partial``: a Partial sum or average stays (in place, where
    each rank's partial goes through the same mask: dropout is linear)."""
    _, Replicate, _ = _placement_types()
    out = [p if _is_plain_shard(p) or (keep_linear_partial and _is_linear_partial(p)) else Replicate()
           for p in placements]
    if unit == ELEMENT:
        sharded = [p.dim for p in out if _is_plain_shard(p) and global_shape[p.dim] > 1]
        if sharded:
            leading = next(d for d, size in enumerate(global_shape) if size > 1)
            keep = {leading, max(sharded)}
            out = [Replicate() if _is_plain_shard(p) and global_shape[p.dim] > 1 and p.dim not in keep else p
                   for p in out]
    return out


def _shard_grid(global_shape, mesh, placements):
    """Shards along each tensor dim, and the shape of the largest shard (the first, as torch.chunk deals them)."""
    grid, largest = [1] * len(global_shape), list(global_shape)
    for mesh_dim, p in enumerate(placements):
        if _is_plain_shard(p):
            parts = mesh.size(mesh_dim)
            grid[p.dim] *= parts
            largest[p.dim] = -(-largest[p.dim] // parts)
    return grid, largest


# --- random streams ----------------------------------------------------------------

_synced = set()  # meshes whose ranks' generators have been brought in step


def _sync_generators(mesh) -> None:
    """The default generator state of the mesh's first rank for every rank of ``mesh``, once per mesh."""
    import torch.distributed as dist

    # The mesh is the key: it hashes once, where its rank tensor (mesh.mesh) is rebuilt on
    # every access, a quarter of a small op's forward.
    if mesh in _synced or mesh.size() == 1:
        return
    _synced.add(mesh)
    if mesh.device_type == "cpu":
        device = torch.device("cpu")
        state = torch.get_rng_state()
    else:  # the state lives on the host; the backend's collectives want it on the device
        device = torch.device(mesh.device_type, torch.accelerator.current_device_index())
        state = torch.get_device_module(mesh.device_type).get_rng_state(device)
    # One mesh dim at a time, since each has a process group and the whole mesh need not (an
    # unnamed mesh cannot be flattened): along each, every rank takes the state of the rank at
    # coordinate 0 there, so that after the last dim all hold the state of the mesh's first rank.
    # Gathered rather than broadcast, with a flag byte, so that every rank learns whether any
    # state differed and warns, rank 0 (often the only one read) too.
    coordinate = mesh.get_coordinate()
    payload = torch.cat([state, state.new_zeros(1)]).to(device)
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        gathered = [torch.empty_like(payload) for _ in range(group.size())]
        dist.all_gather(gathered, payload, group=group)
        first = int(mesh.mesh[tuple(coordinate[:dim]) + (0,) + tuple(coordinate[dim + 1 :])])
        # A group's ranks are in ascending order, not necessarily in the mesh's.
        source = gathered[dist.get_process_group_ranks(group).index(first)]
        differed = any(bool(g[-1]) or not torch.equal(g[:-1], source[:-1]) for g in gathered)
        payload = source.clone()
        payload[-1] = int(differed)
    if payload[-1]:
        warnings.warn(
            "regdrop_ext: the ranks' random generators differed; the state of the mesh's first rank is now every "
            "rank's, so that DTensor ops draw the same stream. Call torch.manual_seed with the same seed on every "
            "rank.",
            stacklevel=4,
        )
    state = payload[:-1].cpu()
    if mesh.device_type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(mesh.device_type).set_rng_state(state, device)


# --- the handlers ------------------------------------------------------------------


def _require_dtensor(t, name: str, op_name: str):
    from torch.distributed.tensor import DTensor

    if t is not None and not isinstance(t, DTensor):
        raise TypeError(
            f"regdrop.{op_name}: {name} is a torch.Tensor and input a DTensor; pass DTensors for both "
            "(torch.distributed.tensor.distribute_tensor or DTensor.from_local)"
        )


def _wrap(local, mesh, placements, shape):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=tuple(_row_major_strides(shape)))


def _per_shard(local, mesh, placements, grid, width):
    """A mask or rng_state as a DTensor of shape (*grid, width) (module docstring)."""
    _, Replicate, _ = _placement_types()
    if local.numel() < width:  # a mask shorter than the largest shard's
        local = torch.cat([local, local.new_zeros(width - local.numel())])
    mask_placements = [p if _is_plain_shard(p) else Replicate() for p in placements]
    return _wrap(local.reshape([1] * len(grid) + [width]), mesh, mask_placements, grid + [width])


def _local_block(x, placements):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(x.shape, x.device_mesh, placements)


def _forward(op, args, kwargs):
    spec = manifest.OPS[op._schema.name.split("::")[1]]
    b = spec.bind(args, kwargs)
    x = b["input"]
    for other in ("residual", "bias"):
        _require_dtensor(b.get(other), other, spec.name)
    mesh, placements, shape = x.device_mesh, tuple(x.placements), tuple(x.shape)
    in_place = spec.variant == "in_place"
    if in_place and any(p.is_partial() and not _is_linear_partial(p) for p in placements):
        raise RuntimeError(
            f"regdrop.{spec.name}: an in-place op on a DTensor with placements {list(placements)} would have to "
            "redistribute it (a Partial that is not a sum or an average), which an in-place op cannot do to its "
            "input; redistribute it first, or use the out-of-place op"
        )
    effective = _effective_placements(placements, shape, spec.unit, keep_linear_partial=in_place)
    Shard, Replicate, _ = _placement_types()

    with torch.no_grad():
        if b.get("generator") is None and b.get("seed") is None:
            _sync_generators(mesh)
        moved = x.redistribute(mesh, effective) if list(effective) != list(placements) else x
        local = moved.to_local()
        if spec.unit == ELEMENT:
            local = local.contiguous()  # element units in row-major order, as the whole tensor's
        local_shape, offsets = _local_block(x, effective)
        b["input"] = local
        if b.get("residual") is not None:
            b["residual"] = b["residual"].redistribute(mesh, effective).to_local()
        if b.get("bias") is not None:
            last = len(shape) - 1
            bias_placements = [Shard(0) if _is_plain_shard(p) and p.dim == last else Replicate() for p in effective]
            b["bias"] = b["bias"].redistribute(mesh, bias_placements).to_local()
        # A shard draws (takes a stream) even when empty, as the larger call does; a larger call
        # with no units draws nothing, so then no rank may.
        if spec.units(shape):
            b["shard"] = list(unit_shard(shape, offsets, local_shape, spec.unit))
        if in_place:
            b["mask"] = spec.new_mask(local)
        out, mask = spec.call(b)
        grid, largest = _shard_grid(shape, mesh, effective)
        width = 2 if spec.variant == "low_memory" else -(-spec.units(largest) // 8)  # rng_state, or mask
        saved = _per_shard(mask, mesh, effective, grid, width)
        result = _wrap(out, mesh, effective, shape)
        # In place: back in the input's own placements, to write its local tensor; else as
        # documented, a Partial input's output is replicated.
        back = list(placements) if in_place else [Replicate() if p.is_partial() else p for p in placements]
        if back != list(effective):
            result = result.redistribute(mesh, back)
        if in_place:
            # The op wrote x's own memory unless the local was copied (redistributed, or made
            # contiguous). to_local() returns a new view each call, whose strides may differ
            # in size-1 dims: compare the memory, as copy_ onto such a view would refuse.
            if result.to_local().data_ptr() != x.to_local().data_ptr():
                x.to_local().copy_(result.to_local())
            return x, saved
    return result, saved


def _backward(op, args, kwargs):
    spec = manifest.OPS[op._schema.name.split("::")[1]]
    b = spec.bind(args, kwargs)
    grad = b["grad"]
    state_name = spec.tensors[1]
    saved = b[state_name]
    _require_dtensor(saved, state_name, spec.name)
    mesh, shape = grad.device_mesh, tuple(grad.shape)
    Shard, Replicate, Partial = _placement_types()
    target = []
    for p_saved, p_grad in zip(saved.placements, grad.placements):
        if _is_plain_shard(p_saved):
            target.append(p_saved)
        else:  # the mask is the same on these ranks: a partial sum goes through it as it is
            target.append(p_grad if _is_linear_partial(p_grad) else Replicate())
    mask_placements = [p if _is_plain_shard(p) else Replicate() for p in target]

    with torch.no_grad():
        moved = grad.redistribute(mesh, target) if list(target) != list(grad.placements) else grad
        local = moved.to_local()
        if spec.unit == ELEMENT:
            local = local.contiguous()
        local_shape, offsets = _local_block(grad, mask_placements)
        units = spec.units(local_shape)
        local_saved = saved.to_local().reshape(-1)
        b["grad"] = local
        if state_name == "mask":
            b["mask"] = local_saved[: -(-units // 8)]
        else:
            b["rng_state"] = local_saved
            b["shard"] = list(unit_shard(shape, offsets, local_shape, spec.unit))
        result = spec.call(b)
        grad_input, grad_bias = result if spec.bias else (result, None)
        grad_input = _wrap(grad_input, mesh, target, shape)
        # Sharded again where grad was and the op replicated it (a local slice), as the forward's
        # output went back to the input's placements: so a leaf's .grad, and optimizer state made
        # from it, is placed as the leaf, not replicated wider.
        back = [g if t.is_replicate() and not g.is_partial() else t for g, t in zip(grad.placements, target)]
        if back != list(target):
            grad_input = grad_input.redistribute(mesh, back)
        if grad_bias is None:
            return grad_input
        last = len(shape) - 1
        bias_placements = []
        for p in target:
            if _is_plain_shard(p):
                bias_placements.append(Shard(0) if p.dim == last else Partial())
            else:
                bias_placements.append(p)
        return grad_input, _wrap(grad_bias, mesh, bias_placements, (shape[-1],))


def register() -> None:
    """Registers the handlers with DTensor's dispatcher, the norm family's
    (norm_dtensor) too (done at the import of torch.distributed.tensor, or at
    regdrop_ext's if that came first)."""
    from torch.distributed.tensor import DTensor

    from . import norm_dtensor

    handlers = DTensor._op_dispatcher._custom_op_handlers
    for spec in manifest.ops():
        handlers[spec.op.default] = _forward if spec.is_forward else _backward
    norm_dtensor.register(handlers)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs register() right after torch.distributed.tensor is imported, so that
    importing regdrop_ext does not import DTensor (about 0.4 s) for everyone."""

    NAME = "torch.distributed.tensor"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_imported() -> None:
    if not torch.distributed.is_available():
        return
    if _RegisterOnImport.NAME in sys.modules:
        register()
    else:
        sys.meta_path.insert(0, _RegisterOnImport())
