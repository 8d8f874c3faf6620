"""regdrop_ext on DTensors (regdrop_ext/dtensor.py, norm_dtensor.py): a sharded call gives
exactly the output and the gradients of the same call on the whole tensor,
for every op, placement and mesh, and a tensor-parallel MLP block trains as
the same block does in one process. CPU processes, gloo, a file store in
tmp_path.

Starting the processes costs seconds, so each test is one spawn that runs a
whole matrix of checks. Mismatches are collected and reported together, each
with its case; an exception in a case fails the spawn at once
(start_processes then ends the other ranks, which would wait for it in a
collective).
"""

import copy
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

import regdrop_ext
from helpers import in_place, spawn_ranks

pytestmark = pytest.mark.slow  # other processes: started first (conftest.py)

ops = torch.ops.regdrop


# --- processes ---------------------------------------------------------------------


def _entry(rank: int, world: int, store: str, worker) -> None:
    torch.set_num_threads(1)
    # A short timeout: a rank left behind in a collective fails the test instead of hanging it.
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        mismatches = worker(rank, world)
        if mismatches:
            shown = "\n  ".join(mismatches[:40])
            more = f"\n  ... and {len(mismatches) - 40} more" if len(mismatches) > 40 else ""
            raise AssertionError(f"rank {rank}: {len(mismatches)} mismatches:\n  {shown}{more}")
    finally:
        dist.destroy_process_group()
        time.sleep(0.1)  # gloo's threads free the last tensors first: see examples/ddp_train.py


def spawn(worker, world: int, tmp_path) -> None:
    spawn_ranks(_entry, (world, str(tmp_path / "store"), worker), world)


class Mismatches(list):
    def equal(self, case: str, what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
        if got.shape != expected.shape:
            self.append(f"{case}: {what} has shape {list(got.shape)}, expected {list(expected.shape)}")
        elif not torch.equal(got, expected):
            wrong = int((got != expected).sum())
            self.append(f"{case}: {what} differs in {wrong} of {got.numel()} elements")

    def close(self, case: str, what: str, got: torch.Tensor, expected: torch.Tensor, **tolerance) -> None:
        try:
            torch.testing.assert_close(got, expected, **tolerance)
        except AssertionError as e:
            self.append(f"{case}: {what}: {e}")

    def true(self, case: str, what: str, condition: bool) -> None:
        if not condition:
            self.append(f"{case}: {what}")


def all_ranks_equal(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


# --- the ops, each called through the raw op (with seed=) and the API (generator) ---

P = 0.3
P_BIAS = 0.5  # scale 2: with integer-valued inputs the bias gradient's sums are exact in any order
SEEDED = {"seed": 1234, "offset": 5}


def _in_place(op, x, **rng):
    y = x.clone()  # autograd refuses in-place writes to leaves
    in_place(op._qualified_op_name.split("::")[1], y, P, **rng)
    return y


def _channel_api(dim: int):
    return {3: regdrop_ext.dropout1d, 5: regdrop_ext.dropout3d}.get(dim, regdrop_ext.dropout2d)


# name -> (operands beside input, call with seed=, call through the functional API)
OPS = {
    "dropout": ((), lambda t: ops.dropout(t["input"], P, **SEEDED)[0], lambda t: regdrop_ext.dropout(t["input"], P)),
    "dropout_": (
        (),
        lambda t: _in_place(ops.dropout_, t["input"], **SEEDED),
        lambda t: regdrop_ext.dropout(t["input"].clone(), P, inplace=True),
    ),
    "dropout_add": (
        ("residual",),
        lambda t: ops.dropout_add(t["input"], t["residual"], P, **SEEDED)[0],
        lambda t: regdrop_ext.dropout_add(t["input"], t["residual"], P),
    ),
    "dropout_low_memory": (
        (),
        lambda t: ops.dropout_low_memory(t["input"], P, **SEEDED)[0],
        lambda t: regdrop_ext.dropout(t["input"], P, low_memory=True),
    ),
    "dropout_add_low_memory": (
        ("residual",),
        lambda t: ops.dropout_add_low_memory(t["input"], t["residual"], P, **SEEDED)[0],
        lambda t: regdrop_ext.dropout_add(t["input"], t["residual"], P, low_memory=True),
    ),
    "bias_dropout_add": (
        ("bias", "residual"),
        lambda t: ops.bias_dropout_add(t["input"], t["bias"], t["residual"], P_BIAS, **SEEDED)[0],
        lambda t: regdrop_ext.bias_dropout_add(t["input"], t["bias"], t["residual"], P_BIAS),
    ),
    "channel_dropout": (
        (),
        lambda t: ops.channel_dropout(t["input"], P, **SEEDED)[0],
        lambda t: _channel_api(t["input"].dim())(t["input"], P),
    ),
    "channel_dropout_": (
        (),
        lambda t: _in_place(ops.channel_dropout_, t["input"], **SEEDED),
        lambda t: _channel_api(t["input"].dim())(t["input"].clone(), P, inplace=True),
    ),
    "drop_path": (
        (),
        lambda t: ops.drop_path(t["input"], P, **SEEDED)[0],
        lambda t: regdrop_ext.drop_path(t["input"], P, training=True),
    ),
    "drop_path_add": (
        ("residual",),
        lambda t: ops.drop_path_add(t["input"], t["residual"], P, **SEEDED)[0],
        lambda t: regdrop_ext.drop_path_add(t["input"], t["residual"], P),
    ),
}
ELEMENT_OPS = ["dropout", "dropout_", "dropout_add", "dropout_low_memory", "dropout_add_low_memory"]
CHANNEL_OPS = ["channel_dropout", "channel_dropout_"]
SAMPLE_OPS = ["drop_path", "drop_path_add"]


def _operands(name: str, shape, case_seed: int) -> dict:
    """Full operands, the same on every rank (drawn from a generator of their own);
    integer-valued, so that sums of them are exact."""
    g = torch.Generator().manual_seed(case_seed)
    draw = lambda s: torch.randint(-8, 9, s, generator=g).float()  # noqa: E731
    operands = {"input": draw(shape)}
    for other in OPS[name][0]:
        operands[other] = draw((shape[-1],) if other == "bias" else shape)
    return operands


def _bias_placements(placements, ndim: int):
    """The bias's placements for an input with ``placements``: sharded along with the input's last dim."""

    return [Shard(0) if isinstance(p, Shard) and p.dim in (ndim - 1, -1) else Replicate() for p in placements]


def check_op(bad: Mismatches, mesh, name: str, shape, placements, api: bool, case_seed: int,
             residual_placements=None) -> None:  # fmt: skip
    """The op on DTensors with ``placements`` against the op on the whole tensors:
    output and every operand's gradient, bit for bit. ``api``: through the
    functional API from the default generator (the same torch.manual_seed on
    every rank before each of the two runs), else the raw op with seed=."""

    case = f"{name}{list(shape)} {list(placements)} {'generator' if api else 'seed'}"
    try:
        call = OPS[name][2] if api else OPS[name][1]
        full = _operands(name, shape, case_seed)
        wanted = {
            "input": placements,
            "residual": residual_placements or placements,
            "bias": _bias_placements(placements, len(shape)),
        }

        torch.manual_seed(case_seed)
        plain = {k: v.clone().requires_grad_() for k, v in full.items()}
        expected = call(plain)
        moved = torch.get_rng_state()
        grad = torch.randint(-8, 9, expected.shape, generator=torch.Generator().manual_seed(case_seed + 1)).float()
        expected.backward(grad)

        torch.manual_seed(case_seed)
        sharded = {
            k: distribute_tensor(v, mesh, wanted[k], src_data_rank=None).requires_grad_() for k, v in full.items()
        }
        out = call(sharded)
        bad.true(case, "the generator moved otherwise than in the whole-tensor call",
                 torch.equal(torch.get_rng_state(), moved))  # fmt: skip
        bad.true(case, f"output placements {list(out.placements)}, the input's {list(placements)}",
                 list(out.placements) == list(placements))  # fmt: skip
        out.backward(distribute_tensor(grad, mesh, out.placements, src_data_rank=None))

        bad.equal(case, "output", out.full_tensor(), expected.detach())
        for k in full:
            bad.equal(case, f"{k}.grad", sharded[k].grad.full_tensor(), plain[k].grad)
        bad.true(case, f"input.grad placements {list(sharded['input'].grad.placements)}, the input's",
                 list(sharded["input"].grad.placements) == list(placements))  # fmt: skip
        if all(p.is_replicate() for p in placements):
            bad.true(case, "replicated input, but ranks drew different masks", all_ranks_equal(out.to_local()))
    except Exception as e:
        raise RuntimeError(f"case {case} raised") from e


def check_saved_shapes(bad: Mismatches, mesh, world: int) -> None:
    """The mask (or rng_state) of a DTensor op: (*shards per dim, bytes), placed as the input."""

    x = distribute_tensor(torch.ones(5, 3, 7), mesh, [Shard(1)], src_data_rank=None)
    _, mask = ops.dropout(x, P, seed=1)
    bad.true("mask of dropout[5, 3, 7] Shard(1)", f"shape {list(mask.shape)}, placements {mask.placements}",
             list(mask.shape) == [1, world, 1, -(-5 * 2 * 7 // 8)] and mask.placements == (Shard(1),))  # fmt: skip
    _, state = ops.dropout_low_memory(x, P, seed=1)
    bad.true("rng_state of dropout_low_memory[5, 3, 7] Shard(1)", f"shape {list(state.shape)}",
             list(state.shape) == [1, world, 1, 2])  # fmt: skip
    _, mask = ops.drop_path(distribute_tensor(torch.ones(6, 3), mesh, [Replicate()]), P, seed=1)
    bad.true("mask of drop_path[6, 3] Replicate", f"shape {list(mask.shape)}", list(mask.shape) == [1, 1, 1])


def check_generators_in_step(bad: Mismatches, mesh, calls) -> None:
    """Generator-drawn calls in a row, some on empty shards, seeded once: each
    matches the whole-tensor run, and every rank's generator ends in the same state."""

    inputs = [torch.randn(shape, generator=torch.Generator().manual_seed(k)) for k, (shape, _) in enumerate(calls)]
    torch.manual_seed(77)
    expected = [regdrop_ext.dropout(x, P) for x in inputs]
    after = torch.get_rng_state()
    torch.manual_seed(77)
    for k, ((shape, placements), x) in enumerate(zip(calls, inputs)):
        out = regdrop_ext.dropout(distribute_tensor(x, mesh, placements, src_data_rank=None), P)
        bad.equal(f"call {k} of a row, dropout{list(shape)} {list(placements)}", "output", out.full_tensor(),
                  expected[k])  # fmt: skip
    bad.true("a row of calls with empty shards", "ranks' generators differ after it",
             all_ranks_equal(torch.get_rng_state()))  # fmt: skip
    bad.true("a row of calls with empty shards", "the generator did not move as in the whole-tensor run",
             torch.equal(torch.get_rng_state(), after))  # fmt: skip


# --- 2 ranks: every op along every dim; the norm ops and the MLP blocks below too ----


def _two_ranks(rank: int, world: int) -> list:
    mesh = init_device_mesh("cpu", (world,))
    bad = Mismatches()

    # Differently seeded ranks: the first generator-drawn DTensor call brings them in step, with a warning.
    torch.manual_seed(1000 + rank)
    x = DTensor.from_local(torch.ones(4, 8), mesh, [Shard(0)])  # each rank its own rows: no comparison needed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        regdrop_ext.dropout(x, 0.5)
    said = [str(w.message) for w in caught if "random generators differed" in str(w.message)]
    bad.true("first generator-drawn call, ranks seeded apart", f"{len(said)} warnings instead of 1", len(said) == 1)
    bad.true("first generator-drawn call, ranks seeded apart", "generators still differ after it",
             all_ranks_equal(torch.get_rng_state()))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = regdrop_ext.dropout(DTensor.from_local(torch.ones(64), mesh, [Replicate()]), 0.5)
    bad.true("second generator-drawn call", "warned again", not caught)
    bad.true("second generator-drawn call", "ranks drew different masks", all_ranks_equal(y.to_local()))

    case_seed = 0
    cases = []
    for shape in [(5, 3, 7), (1, 6), (9,)]:  # uneven; a dim of 1: one rank's shard is empty
        for name in ELEMENT_OPS:
            cases += [(name, shape, [Shard(d)]) for d in range(len(shape))] + [(name, shape, [Replicate()])]
    for name in CHANNEL_OPS:
        cases += [(name, (3, 5, 4, 3), [p]) for p in (Shard(0), Shard(1), Shard(2), Shard(3), Replicate())]
        cases += [(name, (1, 1, 5, 2), [p]) for p in (Shard(0), Shard(1))]  # empty shards
        cases += [(name, (2, 3, 2, 2, 3), [Shard(2)])]  # dropout3d's
    for name in SAMPLE_OPS:
        cases += [(name, (5, 3, 4), [p]) for p in (Shard(0), Shard(1), Shard(2), Replicate())]
        cases += [(name, (1, 4), [Shard(0)])]
    cases += [("bias_dropout_add", (5, 7), [p]) for p in (Shard(1), Shard(0), Replicate())]  # columns, rows
    cases += [("bias_dropout_add", (3, 5, 7), [p]) for p in (Shard(2), Shard(1), Shard(0))]
    for name, shape, placements in cases:
        for api in (False, True):
            case_seed += 1
            check_op(bad, mesh, name, shape, placements, api, case_seed)

    # Tensors with no units at all: no rank draws, as the whole-tensor call does not.
    for name, shape, placement in [("dropout", (0, 4), Shard(0)), ("dropout_add_low_memory", (0, 4), Shard(1)),
                                   ("bias_dropout_add", (0, 5), Shard(1)), ("channel_dropout", (0, 3, 2, 2), Shard(0)),
                                   ("channel_dropout_", (2, 3, 0, 2), Shard(2)), ("drop_path", (0, 3), Shard(0)),
                                   ("drop_path_add", (3, 0), Shard(1))]:  # fmt: skip
        for api in (False, True):
            case_seed += 1
            check_op(bad, mesh, name, shape, [placement], api, case_seed)

    # A residual placed otherwise than the input is brought to the input's placements.
    check_op(bad, mesh, "dropout_add", (4, 6), [Shard(1)], False, 500, residual_placements=[Replicate()])
    check_op(bad, mesh, "drop_path_add", (4, 6), [Shard(0)], True, 501, residual_placements=[Shard(1)])

    # A Partial input (rank 0 holds the values, the others zeros) is reduced first; the output is replicated.
    full = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    partial = DTensor.from_local(full if rank == 0 else torch.zeros_like(full), mesh, [Partial()])
    out = ops.dropout(partial, P, seed=9)[0]
    bad.equal("dropout of a Partial input", "output", out.full_tensor(), ops.dropout(full, P, seed=9)[0])
    bad.true("dropout of a Partial input", f"output placements {out.placements}", out.placements == (Replicate(),))
    # In place on a Partial sum or average: each rank's partial goes through the one mask (dropout
    # is linear), and the tensor stays Partial; no reduction, no factor of the world size.
    for name, reduce_op in [("dropout_", "sum"), ("channel_dropout_", "sum"), ("dropout_", "avg")]:
        local = full / 2 if reduce_op == "sum" else full
        written = DTensor.from_local(local.clone(), mesh, [Partial(reduce_op)])
        in_place(name, written, P, seed=9)
        expected = in_place(name, full.clone(), P, seed=9)[0]
        case = f"{name} of a Partial({reduce_op}) input"
        bad.equal(case, "output", written.full_tensor(), expected)
        bad.true(case, f"placements {written.placements}", written.placements == (Partial(reduce_op),))
    try:
        in_place("dropout_", DTensor.from_local(full.clone(), mesh, [Partial("max")]), P, seed=9)
        bad.true("dropout_ of a Partial(max) input", "no error", False)
    except RuntimeError as error:
        bad.true("dropout_ of a Partial(max) input", str(error), "redistribute it first" in str(error))

    # A DTensor whose shards are not contiguous (a transposed one): its units are numbered
    # row-major, as in the whole tensor that full_tensor() gives.
    transposed = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]).t()
    out = ops.dropout(transposed, P, seed=4)[0]
    whole = transposed.full_tensor()
    bad.true("dropout of a transposed DTensor", "full_tensor() not contiguous", whole.is_contiguous())
    bad.equal("dropout of a transposed DTensor", "output", out.full_tensor(), ops.dropout(whole, P, seed=4)[0])
    written = transposed.clone()  # non-contiguous shards: the op writes a contiguous copy, copied back
    in_place("dropout_", written, P, seed=4)
    bad.equal("dropout_ of a transposed DTensor", "output", written.full_tensor(), out.full_tensor())

    # A generator passed in: each rank draws from its own, in the same state.
    full = torch.randn(5, 6)
    expected = ops.dropout(full, P, torch.Generator().manual_seed(8))[0]
    out = ops.dropout(distribute_tensor(full, mesh, [Shard(1)]), P, torch.Generator().manual_seed(8))[0]
    bad.equal("dropout with generator=", "output", out.full_tensor(), expected)

    # A residual that is no DTensor is refused, with the fix in the message.
    try:
        ops.dropout_add(distribute_tensor(full, mesh, [Shard(0)]), full, P, seed=1)
        bad.append("dropout_add with a torch.Tensor residual: not refused")
    except TypeError as e:
        bad.true("dropout_add with a torch.Tensor residual", f"message: {e}", "DTensor.from_local" in str(e))

    # The modules, on DTensors, from the default generator.
    module_cases = [
        (regdrop_ext.Dropout(P), [(7, 5)], Shard(0)),
        (regdrop_ext.Dropout(P, low_memory=True), [(7, 5)], Shard(1)),
        (regdrop_ext.DropoutAdd(P), [(3, 4, 5), (3, 4, 5)], Shard(2)),
        (regdrop_ext.DropoutAdd(P, low_memory=True), [(3, 4, 5), (3, 4, 5)], Shard(1)),
        (regdrop_ext.BiasDropoutAdd(P_BIAS), [(6, 5), (5,), (6, 5)], Shard(0)),
        (regdrop_ext.DropPath(P), [(5, 2, 3)], Shard(0)),
        (regdrop_ext.DropPathAdd(P), [(5, 2, 3), (5, 2, 3)], Shard(2)),
        (regdrop_ext.Dropout1d(P), [(3, 5, 6)], Shard(2)),
        (regdrop_ext.Dropout2d(P), [(3, 5, 2, 2)], Shard(1)),
        (regdrop_ext.Dropout3d(P), [(2, 3, 2, 2, 3)], Shard(0)),
    ]
    for k, (module, shapes, placement) in enumerate(module_cases):
        check_module(bad, mesh, module, shapes, placement, 600 + k)

    check_saved_shapes(bad, mesh, world)
    check_generators_in_step(bad, mesh, [((1, 6), [Shard(0)]), ((1, 1), [Shard(1)]), ((5, 4), [Shard(1)]),
                                         ((3, 4), [Replicate()])])  # fmt: skip
    # In this spawn too: starting the processes is most of a spawn's time.
    check_norm_ops(bad, mesh, rank)
    check_tensor_parallel_mlp(bad, mesh)
    return bad


def check_module(bad: Mismatches, mesh, module, shapes, placement, case_seed: int) -> None:
    case = f"{module!r} on {shapes} {placement}"
    try:
        g = torch.Generator().manual_seed(case_seed)
        full = [torch.randint(-8, 9, s, generator=g).float() for s in shapes]
        torch.manual_seed(case_seed)
        plain = [t.clone().requires_grad_() for t in full]
        expected = module(*plain)
        expected.backward(torch.ones_like(expected))
        torch.manual_seed(case_seed)
        sharded = [
            distribute_tensor(t, mesh, [placement if t.dim() == len(shapes[0]) else Replicate()],
                              src_data_rank=None).requires_grad_()
            for t in full
        ]  # fmt: skip
        out = module(*sharded)
        out.backward(torch.distributed.tensor.ones(out.shape, device_mesh=mesh, placements=out.placements))
        bad.equal(case, "output", out.full_tensor(), expected.detach())
        for k, (s, t) in enumerate(zip(sharded, plain)):
            bad.equal(case, f"grad of operand {k}", s.grad.full_tensor(), t.grad)
    except Exception as e:
        raise RuntimeError(f"case {case} raised") from e


def test_ops_and_a_tensor_parallel_mlp_on_two_ranks_match_one_process(tmp_path):
    spawn(_two_ranks, 2, tmp_path)


# --- 4 ranks: empty shards on a 1-D mesh, and a 2x2 mesh -----------------------------


def _four_ranks(rank: int, world: int) -> list:
    bad = Mismatches()
    # Differently seeded ranks on a 2-D mesh whose ranks are not in ascending order: the first
    # generator-drawn call gives all the state of the mesh's first rank (rank 3), and every rank warns.
    backwards = DeviceMesh("cpu", [[3, 2], [1, 0]])
    torch.manual_seed(1000 + rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = regdrop_ext.dropout(distribute_tensor(torch.ones(64), backwards, [Replicate(), Replicate()]), 0.5)
    case = "first generator-drawn call on mesh [[3, 2], [1, 0]], ranks seeded apart"
    said = [w for w in caught if "random generators differed" in str(w.message)]
    bad.true(case, f"{len(said)} warnings instead of 1", len(said) == 1)
    bad.true(case, "ranks' generators differ after it", all_ranks_equal(torch.get_rng_state()))
    torch.manual_seed(1003)
    bad.equal(case, "output", out.to_local(), regdrop_ext.dropout(torch.ones(64), 0.5))

    torch.manual_seed(0)  # the same generator state on every rank
    line = init_device_mesh("cpu", (world,))
    case_seed = 1000
    cases = []
    # 5 -> 2, 2, 1, 0; 3 -> 1, 1, 1, 0; 2 -> 1, 1, 0, 0
    for name in ELEMENT_OPS:
        cases += [(name, (5, 3, 2), [Shard(d)]) for d in range(3)]
    for name in CHANNEL_OPS:
        cases += [(name, (2, 3, 5), [Shard(d)]) for d in range(3)]
    for name in SAMPLE_OPS:
        cases += [(name, (3, 5), [Shard(d)]) for d in range(2)]
    cases += [("bias_dropout_add", (5, 3), [Shard(d)]) for d in range(2)]
    for name, shape, placements in cases:
        for api in (False, True):
            case_seed += 1
            check_op(bad, line, name, shape, placements, api, case_seed)
    check_generators_in_step(bad, line, [((3, 2), [Shard(0)]), ((2, 2), [Shard(1)]), ((5, 6), [Shard(1)]),
                                         ((1, 3), [Shard(0)]), ((6, 4), [Shard(0)])])  # fmt: skip

    square = init_device_mesh("cpu", (2, 2))
    S0, S1, S2, S3, R = Shard(0), Shard(1), Shard(2), Shard(3), Replicate()
    element = [(S0, S1), (S1, S0), (S0, S2), (S2, S0), (S1, S2), (S2, S1), (S0, S0), (S2, S2), (R, S1),
               (S2, R), (R, R)]  # fmt: skip
    cases = []
    for name in ELEMENT_OPS:
        cases += [(name, (5, 6, 7), list(p)) for p in element]
        cases += [(name, (1, 6, 7), list(p)) for p in [(S1, S2), (S2, S1)]]  # dim 0 of 1: dim 1 leads
    for name in CHANNEL_OPS:
        cases += [(name, (3, 5, 4, 3), list(p)) for p in [(S0, S1), (S1, S0), (S1, S2), (S2, S3), (S0, S0)]]
    for name in SAMPLE_OPS:
        cases += [(name, (5, 3, 4), list(p)) for p in [(S0, S1), (S1, S2), (S1, S0)]]
    cases += [("bias_dropout_add", (3, 5, 7), list(p)) for p in [(S0, S2), (S2, S0), (S1, S2), (S0, S1), (R, S2)]]
    # As FSDP2 with tensor parallelism shards dim 0 on both mesh dims: redistributed, then placed back.
    strided = [_StridedShard(0, split_factor=2), S0]
    cases += [(name, (8, 3), strided) for name in ELEMENT_OPS + SAMPLE_OPS + ["bias_dropout_add"]]
    cases += [(name, (8, 3, 2), strided) for name in CHANNEL_OPS]
    for name, shape, placements in cases:
        for api in (False, True):
            case_seed += 1
            check_op(bad, square, name, shape, placements, api, case_seed)
    return bad


def test_ops_on_four_ranks_and_a_2x2_mesh_match_the_whole_tensor(tmp_path):
    spawn(_four_ranks, 4, tmp_path)


# --- a tensor-parallel MLP block -----------------------------------------------------

DIM, HIDDEN, BATCH, SEQ = 8, 32, 2, 6
TOLERANCE = {"rtol": 1e-12, "atol": 1e-12}  # float64; the sharded matmuls only sum in another order


class MLPBlock(nn.Module):
    """x + drop(fc2(drop(gelu(fc1(norm(x)))))), the last drop-and-add fused or not."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.act = nn.GELU()
        self.drop_hidden = regdrop_ext.Dropout(0.25)
        self.fc2 = nn.Linear(HIDDEN, DIM)
        self.fused = fused
        self.drop_out = regdrop_ext.DropoutAdd(0.25) if fused else regdrop_ext.Dropout(0.25)

    def forward(self, x):
        h = self.fc2(self.drop_hidden(self.act(self.fc1(self.norm(x)))))
        return self.drop_out(h, x) if self.fused else x + self.drop_out(h)


def tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Megatron's layout with sequence parallelism: LayerNorm and the output
    dropout on the sequence-sharded activation, fc1 column-, fc2 row-parallel;
    the hidden dropout on the column-sharded activation (a DTensor)."""
    for block in model.children():
        plan = {
            "norm": SequenceParallel(),
            "fc1": ColwiseParallel(input_layouts=Shard(1), use_local_output=False),
            "fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        }
        if not block.fused:
            plan["drop_out"] = SequenceParallel()
        parallelize_module(block, mesh, plan)
    return model


def check_tensor_parallel_mlp(bad: Mismatches, mesh) -> None:
    """Two MLP blocks, tensor parallel, against the same blocks in one process:
    one step's masks, outputs and gradients, then the losses and parameters of a
    few SGD steps."""
    torch.manual_seed(0)
    reference = nn.Sequential(MLPBlock(fused=False), MLPBlock(fused=True)).double()
    model = tensor_parallel(copy.deepcopy(reference), mesh)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, DIM, generator=data, dtype=torch.float64)

    # One forward and backward: the masks (from forward hooks) equal, values and gradients close.
    def record(into):
        def hook(module, inputs, output):
            kept = output != (inputs[1] if isinstance(module, regdrop_ext.DropoutAdd) else 0)
            into.append(kept.full_tensor() if isinstance(kept, DTensor) else kept)

        return hook

    masks = {"reference": [], "tensor parallel": []}
    for net, into in ((reference, masks["reference"]), (model, masks["tensor parallel"])):
        for m in net.modules():
            if isinstance(m, (regdrop_ext.Dropout, regdrop_ext.DropoutAdd)):
                m.register_forward_hook(record(into))

    torch.manual_seed(5)
    xr = x.clone().requires_grad_()
    expected = reference(xr)
    expected.sum().backward()
    torch.manual_seed(5)
    xt = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None).requires_grad_()
    out = model(xt)
    out.sum().backward()

    case = "tensor-parallel MLP blocks"
    bad.true(case, f"{len(masks['tensor parallel'])} dropout calls, {len(masks['reference'])} in one process",
             len(masks["tensor parallel"]) == len(masks["reference"]) == 4)  # fmt: skip
    for k, (got, want) in enumerate(zip(masks["tensor parallel"], masks["reference"])):
        bad.equal(case, f"mask of dropout call {k}", got, want)
        bad.true(case, f"dropout call {k} kept all or nothing", 0 < int(want.sum()) < want.numel())
    bad.true(case, f"output placements {out.placements}", out.placements == (Shard(1),))
    bad.close(case, "output", out.full_tensor(), expected.detach(), **TOLERANCE)
    bad.close(case, "input gradient", xt.grad.full_tensor(), xr.grad, **TOLERANCE)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        bad.close(case, f"gradient of {name}", p.grad.full_tensor(), q.grad, **TOLERANCE)

    # A few SGD steps from one seed: the generators move alike, so every step draws the same masks.
    def train(net, inputs, target):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        losses = []
        torch.manual_seed(11)
        for _ in range(4):
            optimizer.zero_grad()
            loss = ((net(inputs) - target) ** 2).mean()
            loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    target = torch.randn(BATCH, SEQ, DIM, generator=data, dtype=torch.float64)
    for net in (model, reference):
        for m in net.modules():
            m._forward_hooks.clear()
    want = train(reference, x, target)
    got = train(model, distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None),
                distribute_tensor(target, mesh, [Shard(1)], src_data_rank=None))  # fmt: skip
    bad.close("training", "per-step losses", torch.tensor(got), torch.tensor(want), **TOLERANCE)
    bad.true("training", f"loss did not move: {want}", len(set(want)) == len(want))
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        bad.close("training", f"{name} after the steps", p.full_tensor(), q.detach(), **TOLERANCE)


# --- the norm ops: dropout + residual + LayerNorm / RMSNorm (regdrop_ext/norm_dtensor.py) ---


def _norm_case(name: str, api: bool):
    """call(t) -> (output, residual_out[, mean, rstd]): the raw op with seed=, or the functional form."""
    raw = {
        "layer": lambda t: ops.dropout_add_norm(t["input"], t["residual"], t["weight"], t["bias"], P, 1e-5, False,
                                                t["input_bias"], **SEEDED),
        "rms": lambda t: ops.dropout_add_norm(t["input"], None, t["weight"], None, P, 1e-5, True, **SEEDED),
        "drop_path": lambda t: ops.dropout_add_norm(t["input"], t["residual"], t["weight"], t["bias"], P,
                                                    drop_path=True, **SEEDED),
        "low_memory": lambda t: ops.dropout_add_norm_low_memory(t["input"], t["residual"], t["weight"], None, P,
                                                                1e-5, True, t["input_bias"], **SEEDED),
    }
    public = {
        "layer": lambda t: regdrop_ext.dropout_add_layer_norm(t["input"], t["residual"], t["weight"], t["bias"], P,
                                                              input_bias=t["input_bias"], prenorm=True),
        "rms": lambda t: (regdrop_ext.dropout_add_rms_norm(t["input"], None, t["weight"], P, 1e-5),),
        "drop_path": lambda t: regdrop_ext.drop_path_add_layer_norm(t["input"], t["residual"], t["weight"],
                                                                    t["bias"], P, prenorm=True),
        "low_memory": lambda t: regdrop_ext.dropout_add_rms_norm(t["input"], t["residual"], t["weight"], P, 1e-5,
                                                                 input_bias=t["input_bias"], prenorm=True,
                                                                 low_memory=True),
    }
    if api:
        return public[name]
    return lambda t: [out for k, out in enumerate(raw[name](t)) if k != 2]  # all but the mask


def check_norm_op(bad: Mismatches, mesh, name: str, shape, placements, api: bool, case_seed: int) -> None:
    """A norm op on DTensors against the op on the whole tensors: output,
    residual stream and row statistics, and the input's and residual's
    gradients, bit for bit; the parameters' gradients (partial column sums
    added across ranks) within float64 rounding."""
    case = f"norm {name}{list(shape)} {list(placements)} {'generator' if api else 'seed'}"
    try:
        call = _norm_case(name, api)
        g = torch.Generator().manual_seed(case_seed)
        full = {"input": torch.randn(shape, generator=g, dtype=torch.float64),
                "residual": torch.randn(shape, generator=g, dtype=torch.float64)}
        full.update({k: torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5
                     for k in ("weight", "bias", "input_bias")})

        torch.manual_seed(case_seed)
        plain = {k: v.clone().requires_grad_() for k, v in full.items()}
        expected = call(plain)
        moved = torch.get_rng_state()
        grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in expected[:2]]
        torch.autograd.backward(list(expected[:2]), grads)

        torch.manual_seed(case_seed)
        wanted = {"input": placements, "residual": placements}
        sharded = {k: distribute_tensor(v, mesh, wanted.get(k, [Replicate()]), src_data_rank=None).requires_grad_()
                   for k, v in full.items()}  # fmt: skip
        out = call(sharded)
        bad.true(case, "the generator moved otherwise than in the whole-tensor call",
                 torch.equal(torch.get_rng_state(), moved))  # fmt: skip
        bad.true(case, f"output placements {list(out[0].placements)}, the input's {list(placements)}",
                 list(out[0].placements) == list(placements))  # fmt: skip
        torch.autograd.backward(list(out[:2]), [distribute_tensor(t, mesh, o.placements, src_data_rank=None)
                                                for t, o in zip(grads, out)])  # fmt: skip
        for k, (got, want) in enumerate(zip(out, expected)):
            bad.equal(case, ["output", "residual_out", "mean", "rstd"][k], got.full_tensor(), want.detach())
        for k in full:
            if plain[k].grad is None:
                bad.true(case, f"{k}.grad exists, but not in the whole-tensor call", sharded[k].grad is None)
            elif k in ("input", "residual"):
                bad.equal(case, f"{k}.grad", sharded[k].grad.full_tensor(), plain[k].grad)
            else:
                bad.close(case, f"{k}.grad", sharded[k].grad.full_tensor(), plain[k].grad, rtol=1e-12, atol=1e-12)
    except Exception as e:
        raise RuntimeError(f"case {case} raised") from e


def check_norm_ops(bad: Mismatches, mesh, rank: int) -> None:
    """The norm ops on every placement of a 1-D mesh, a Partial input, and a
    shard of the normalized dim (refused)."""
    torch.manual_seed(0)  # the same generator state on every rank
    case_seed = 2000
    cases = [(name, (5, 3, 7), [p]) for name in ("layer", "rms", "drop_path", "low_memory")
             for p in (Shard(0), Shard(1), Replicate())]  # fmt: skip
    cases += [("layer", (1, 6), [Shard(0)]), ("drop_path", (3, 2, 4), [Shard(1)])]  # an empty shard; drop-path
    for name, shape, placements in cases:
        for api in (False, True):
            case_seed += 1
            check_norm_op(bad, mesh, name, shape, placements, api, case_seed)

    # A Partial input (rank 0 holds the values) is reduced first; the outputs are replicated.
    full = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    partial = DTensor.from_local(full if rank == 0 else torch.zeros_like(full), mesh, [Partial()])
    out = ops.dropout_add_norm(partial, None, None, None, P, seed=9)
    bad.equal("dropout_add_norm of a Partial input", "output", out[0].full_tensor(),
              ops.dropout_add_norm(full, None, None, None, P, seed=9)[0])  # fmt: skip
    bad.true("dropout_add_norm of a Partial input", f"placements {out[0].placements}",
             out[0].placements == (Replicate(),))  # fmt: skip

    # A shard of the normalized dim is refused, naming the op, the placement and the fix.
    try:
        ops.dropout_add_norm(distribute_tensor(full, mesh, [Shard(1)]), None, None, None, P, seed=9)
        bad.append("dropout_add_norm of a Shard(1) input of 2 dims: not refused")
    except RuntimeError as e:
        message = str(e)
        bad.true("dropout_add_norm along the normalized dim", f"message: {message}",
                 all(s in message for s in ("regdrop.dropout_add_norm", "Shard(dim=1)", "redistribute")))
