"""The norm ops (dropout + residual + LayerNorm / RMSNorm) on DTensors: each
rank normalizes its own rows, and its shard draws its part of the whole
tensor's mask (regdrop_ext/dtensor.py, whose helpers these handlers use).

Placements. The normalized dim is the last: a row is never split, so
``Shard(d)`` on any other dim and ``Replicate`` run as they are, locally,
with ``shard=`` placing the local units among the whole tensor's (element
units row-major over the whole tensor, drop-path samples by index along dim
0): the shards draw exactly the whole tensor's mask, and each row's
statistics and values are the whole tensor's, bit for bit. ``Partial`` and
``_StridedShard`` inputs, and element shardings unit_shard cannot place, are
first redistributed as for the element ops. ``weight``, ``bias`` and
``input_bias`` are used replicated (a shard of them is gathered). A residual
is brought to the input's placements. Outputs: ``output`` and
``residual_out`` in the input's placements (a Partial input's replicated);
``mean`` and ``rstd`` (shape ``input.shape[:-1]``) in the same; the mask (or
rng_state) per shard, as the element ops' (dtensor.py's docstring).

A ``Shard`` of the normalized dim raises: its rows' sums would have to be
combined across ranks (an all-reduce of the statistics, and another of
backward's row sums), which gives other bits than the sums over whole rows
in the order fixed by the hidden size, the order every other call of these
ops follows. The message says to redistribute (``Replicate`` along that mesh
dim, or a ``Shard`` of a non-normalized dim, as sequence parallelism does).

Backward reads the saved placements, brings the gradients and the saved
tensors to them, and gives ``grad_input`` and ``grad_residual`` placed as
the forward's output; the parameter gradients (``weight``, ``bias``,
``input_bias``) are each rank's column sums over its rows: ``Partial`` sums
along the mesh dims that shard the rows, ``Replicate`` along the others. So
they equal the whole tensor's up to the order the ranks' sums are added in.
"""

import torch

from . import manifest
from .dtensor import (
    _effective_placements,
    _is_plain_shard,
    _local_block,
    _per_shard,
    _placement_types,
    _require_dtensor,
    _shard_grid,
    _sync_generators,
    _wrap,
    unit_shard,
)
from .manifest import ELEMENT, SAMPLE

_PARAMETERS = ("weight", "bias", "input_bias")


def _spec(op) -> manifest.Op:
    return manifest.OPS[op._schema.name.split("::")[1]]


def _unit(bound) -> str:
    return SAMPLE if bound.get("drop_path", False) else ELEMENT


def _units(shape, bound) -> int:
    """The units of a tensor of ``shape``: none (p == 0), samples along dim 0, or elements."""
    if bound["p"] == 0 or len(shape) == 0:
        return 0
    if bound.get("drop_path", False):
        return shape[0]
    n = 1
    for size in shape:
        n *= size
    return n


def _check_rows_whole(name: str, placements, ndim: int, mesh) -> None:
    Shard, _, _ = _placement_types()
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard) and p.dim in (ndim - 1, -1):
            raise RuntimeError(
                f"regdrop.{name}: input is sharded along its normalized (last) dim {ndim - 1} (placements "
                f"{list(placements)}), which would split its rows across ranks; redistribute it first, to "
                f"Replicate() along mesh dim {mesh_dim} or to a Shard of another dim (as sequence parallelism "
                "shards the sequence): x.redistribute(mesh, placements)"
            )


def _replicated_local(t, mesh):
    _, Replicate, _ = _placement_types()
    return t.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()


def _forward(op, args, kwargs):
    spec = _spec(op)
    b = spec.bind(args, kwargs)
    x = b["input"]
    for other in ("residual", *_PARAMETERS):
        _require_dtensor(b.get(other), other, spec.name)
    mesh, placements, shape = x.device_mesh, tuple(x.placements), tuple(x.shape)
    _check_rows_whole(spec.name, placements, len(shape), mesh)
    _, Replicate, _ = _placement_types()
    unit = _unit(b)
    effective = _effective_placements(placements, shape, unit)

    with torch.no_grad():
        if b["p"] > 0 and b.get("generator") is None and b.get("seed") is None:
            _sync_generators(mesh)
        moved = x.redistribute(mesh, effective) if list(effective) != list(placements) else x
        local_shape, offsets = _local_block(x, effective)
        b["input"] = moved.to_local()
        if b.get("residual") is not None:
            b["residual"] = b["residual"].redistribute(mesh, effective).to_local()
        for name in _PARAMETERS:
            if b.get(name) is not None:
                b[name] = _replicated_local(b[name], mesh)
        if _units(shape, b):  # a shard draws even when empty, as the whole call does; no units: no rank draws
            b["shard"] = list(unit_shard(shape, offsets, local_shape, unit))
        output, residual_out, saved, mean, rstd = spec.call(b)

        grid, largest = _shard_grid(shape, mesh, effective)
        width = 2 if spec.variant == "low_memory" else -(-_units(largest, b) // 8)  # rng_state, or mask
        saved = _per_shard(saved, mesh, effective, grid, width)
        back = [Replicate() if p.is_partial() else p for p in placements]
        results = [_wrap(output, mesh, effective, shape), _wrap(residual_out, mesh, effective, shape),
                   _wrap(mean, mesh, effective, shape[:-1]), _wrap(rstd, mesh, effective, shape[:-1])]
        if back != list(effective):
            results = [t.redistribute(mesh, back) for t in results]
    output, residual_out, mean, rstd = results
    return output, residual_out, saved, mean, rstd


def _backward(op, args, kwargs):
    spec = _spec(op)
    b = spec.bind(args, kwargs)
    grad = b["grad_output"]
    state = "rng_state" if spec.variant == "low_memory_backward" else "mask"
    for other in ("grad_residual_out", "residual_out", state, "mean", "rstd", "weight"):
        _require_dtensor(b.get(other), other, spec.name)
    mesh, shape = grad.device_mesh, tuple(grad.shape)
    Shard, Replicate, Partial = _placement_types()
    target = [p if _is_plain_shard(p) else Replicate() for p in b[state].placements]

    with torch.no_grad():
        for name in ("grad_output", "grad_residual_out", "residual_out", "mean", "rstd"):
            if b.get(name) is not None:
                b[name] = b[name].redistribute(mesh, target).to_local()
        if b.get("weight") is not None:
            b["weight"] = _replicated_local(b["weight"], mesh)
        local_shape, offsets = _local_block(grad, target)
        saved = b[state].to_local().reshape(-1)
        if state == "mask":
            b["mask"] = saved[: -(-_units(local_shape, b) // 8)]
        else:
            b["rng_state"] = saved
            if _units(shape, b):
                b["shard"] = list(unit_shard(shape, offsets, local_shape, _unit(b)))
        grad_input, grad_residual, *parameter_grads = spec.call(b)

        # Placed as grad was where the op only replicated it (a local slice), as element ops' backward.
        back = [g if t.is_replicate() and not g.is_partial() else t for g, t in zip(grad.placements, target)]
        row_grads = []
        for t in (grad_input, grad_residual):
            if t is not None:
                t = _wrap(t, mesh, target, shape)
                t = t.redistribute(mesh, back) if back != list(target) else t
            row_grads.append(t)
        column_sums = [Partial() if _is_plain_shard(p) else Replicate() for p in target]
        parameter_grads = [None if t is None else _wrap(t, mesh, column_sums, shape[-1:]) for t in parameter_grads]
    return (*row_grads, *parameter_grads)


def register(handlers) -> None:
    """Adds a handler for every op of the manifest's norm family to DTensor's custom-op handlers."""
    for spec in manifest.ops(family="norm"):
        handlers[spec.op.default] = _forward if spec.is_forward else _backward
