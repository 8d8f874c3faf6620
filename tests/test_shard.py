"""Sharded calls: given shard=(first, run, stride), a random op draws unit i
of its input where a larger call draws unit first + (i // run) * stride +
i % run, so the shards of a tensor draw together exactly what the whole
tensor draws (what DTensor ops are built on: regdrop_ext/dtensor.py).

Each test compares with the larger call itself, bit for bit: masks, outputs,
rng_states and gradients. The CUDA kernels' sharded paths are checked the same
way in test_cuda_emulation.py; DTensor, across processes, in test_dtensor.py.
"""

import itertools

import pytest
import torch

import regdrop_ext
from helpers import in_place
from regdrop_ext.dtensor import unit_shard
from regdrop_ext.manifest import CHANNEL, ELEMENT, SAMPLE

ops = torch.ops.regdrop
P = 0.5
SEED, OFFSET = 11, 5


def unit_bits(mask: torch.Tensor, units: int) -> torch.Tensor:
    return ((mask.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:units].bool()


def padding_is_zero(mask: torch.Tensor, units: int) -> bool:
    return units % 8 == 0 or (mask[-1] >> (units % 8)).item() == 0


def global_units(shard, n: int) -> torch.Tensor:
    first, run, stride = shard
    i = torch.arange(n)
    return first + torch.div(i, run, rounding_mode="floor") * stride + i % run


# --- any (first, run, stride) ---------------------------------------------------------

SHARDS = [
    # (first, run, stride, units)
    (0, 64, 64, 64),          # the whole call
    (8, 16, 40, 96),          # groups of the larger call, whole
    (3, 16, 40, 96),          # starting inside a group
    (5, 13, 29, 100),         # runs that are not whole groups
    (7, 1, 3, 50),            # a unit per run
    (2, 5, 5, 77),            # stride == run: one stretch
    (1, 3, 8, 40),            # runs shorter than a group, many per group
    (9, 1000, 1000, 300),     # a run longer than the call
    (123, 5000, 9001, 20000), # runs across the CPU's 4096-unit blocks
    (2**40 + 3, 700, 2**33, 70000),  # units past 2^32, several threads' worth
]


def the_larger_call(op_name, x, shard, **kwargs):
    """The op on a tensor holding x's elements at their units in the larger call."""
    units = global_units(shard, x.numel())
    whole = torch.zeros(int(units.max()) + 1, dtype=x.dtype)
    whole[units] = x
    out, mask = getattr(ops, op_name)(whole, P, seed=SEED, offset=OFFSET, **kwargs)
    return out[units], unit_bits(mask, whole.numel())[units]


@pytest.mark.parametrize("first, run, stride, units", SHARDS[:-1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_shard_draws_its_units_where_the_larger_call_does(first, run, stride, units, dtype):
    shard = (first, run, stride)
    x = torch.randn(units).to(dtype)
    out, mask = ops.dropout(x, P, seed=SEED, offset=OFFSET, shard=shard)
    expected_out, expected_bits = the_larger_call("dropout", x, shard)
    assert torch.equal(unit_bits(mask, units), expected_bits)
    assert padding_is_zero(mask, units)
    assert torch.equal(out, expected_out)


def test_a_shard_far_into_the_stream_draws_its_units():
    """Units past 2^32, many threads' worth: the bits alone (the larger call would be 2^40 units)."""
    first, run, stride, units = SHARDS[-1]
    _, mask = ops.dropout(torch.ones(units), P, seed=SEED, offset=OFFSET, shard=(first, run, stride))
    g = global_units((first, run, stride), units)
    rows = torch.div(g - first, stride, rounding_mode="floor")
    bits = unit_bits(mask, units)
    for row in [0, 1, int(rows.max())]:  # each run drawn alone, as a call of its own
        in_row = rows == row
        start = first + row * stride
        _, alone = ops.dropout(torch.ones(int(in_row.sum())), P, seed=SEED, offset=OFFSET, shard=(start, run, run))
        assert torch.equal(bits[in_row], unit_bits(alone, int(in_row.sum())))
    # and one run against the larger call's own bits, from a call that covers it
    _, head = ops.dropout(torch.ones(first % 8 + run), P, seed=SEED, offset=OFFSET, shard=(first - first % 8, 10**9, 10**9))
    assert torch.equal(bits[:run], unit_bits(head, first % 8 + run)[first % 8:])


def test_the_shards_of_a_call_draw_the_whole_calls_mask():
    """Every run of a tensor drawn apart and put together: the whole call's mask."""
    x = torch.randn(37, 53)
    whole_out, whole_mask = ops.dropout(x, P, seed=SEED, offset=OFFSET)
    for cut in [1, 8, 26, 52]:
        for lo, hi in [(0, cut), (cut, 53)]:
            shard = unit_shard(x.shape, (0, lo), (37, hi - lo), ELEMENT)
            out, mask = ops.dropout(x[:, lo:hi].contiguous(), P, seed=SEED, offset=OFFSET, shard=shard)
            assert torch.equal(out, whole_out[:, lo:hi])
            assert torch.equal(unit_bits(mask, out.numel()), unit_bits(whole_mask, x.numel()).view(37, 53)[:, lo:hi].flatten())


# --- unit_shard: the map DTensor shards take -------------------------------------------


def brute_force_units(shape, offsets, local_shape, granularity):
    """The global unit of each local unit, by enumeration."""
    ranges = [range(o, o + l) for o, l in zip(offsets, local_shape)]
    if granularity == SAMPLE:
        return [n for n in ranges[0]]
    if granularity == CHANNEL:
        return [n * shape[1] + c for n in ranges[0] for c in ranges[1]]
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return [sum(i * s for i, s in zip(index, strides)) for index in itertools.product(*ranges)]


def blocks(shape):
    """Every block made of a prefix, a middle and a suffix interval on each dim."""
    per_dim = []
    for size in shape:
        cuts = sorted({0, 1, size // 2, size - 1, size})
        per_dim.append([(a, b - a) for a in cuts for b in cuts if a <= b])
    return itertools.product(*per_dim)


@pytest.mark.parametrize("shape", [(5,), (4, 6), (3, 1, 5), (2, 3, 4, 5), (1, 4, 3)])
@pytest.mark.parametrize("granularity", [ELEMENT, SAMPLE, CHANNEL])
def test_unit_shard_places_every_block_or_says_it_cannot(shape, granularity):
    if granularity == CHANNEL and len(shape) < 2:
        pytest.skip("channel units need (N, C, *)")
    placed = 0
    for block in blocks(shape):
        offsets, local = [o for o, _ in block], [l for _, l in block]
        expected = brute_force_units(shape, offsets, local, granularity)
        shard = unit_shard(shape, offsets, local, granularity)
        if shard is None:
            assert granularity == ELEMENT
            # Not one (run, stride): two runs' gaps differ somewhere.
            starts = [u for k, u in enumerate(expected) if k == 0 or u != expected[k - 1] + 1]
            gaps = {b - a for a, b in zip(starts, starts[1:])}
            assert len(gaps) > 1, f"{block}: {expected} has one (run, stride)"
            continue
        placed += 1
        assert global_units(shard, len(expected)).tolist() == expected, f"{shape} {block}: {shard}"
        first, run, stride = shard
        assert first >= 0 and run >= 1 and stride >= run
    assert placed > 0


# --- every random op, on the blocks of a tensor ----------------------------------------


def narrowed(t, dim, lo, hi):
    return t.narrow(dim, lo, hi - lo).contiguous()


def block_shard(shape, dim, lo, hi, granularity):
    offsets = [0] * len(shape)
    local = list(shape)
    offsets[dim], local[dim] = lo, hi - lo
    return unit_shard(shape, offsets, local, granularity)


CASES = [
    # (op, granularity, shape, dims to cut along)
    ("dropout", ELEMENT, (6, 10, 12), (0, 1, 2)),
    ("dropout_add", ELEMENT, (6, 10, 12), (0, 1, 2)),
    ("dropout_low_memory", ELEMENT, (6, 10, 12), (0, 2)),
    ("dropout_add_low_memory", ELEMENT, (6, 10, 12), (1,)),
    ("bias_dropout_add", ELEMENT, (6, 10, 12), (0, 1, 2)),
    ("channel_dropout", CHANNEL, (4, 6, 3, 5), (0, 1, 2)),
    ("drop_path", SAMPLE, (8, 5, 7), (0, 1)),
    ("drop_path_add", SAMPLE, (8, 5, 7), (0, 2)),
]


def run_op(op_name, x, residual, bias, **kwargs):
    op = getattr(ops, op_name)
    if op_name == "bias_dropout_add":
        return op(x, bias, residual, P, seed=SEED, offset=OFFSET, **kwargs)
    if "add" in op_name:
        return op(x, residual, P, seed=SEED, offset=OFFSET, **kwargs)
    return op(x, P, seed=SEED, offset=OFFSET, **kwargs)


@pytest.mark.parametrize("op_name, granularity, shape, dims", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_random_op_on_a_block_equals_the_block_of_the_whole_call(op_name, granularity, shape, dims, dtype):
    torch.manual_seed(0)
    x, residual = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    bias = torch.randn(shape[-1], dtype=dtype)
    whole_out, whole_saved = run_op(op_name, x, residual, bias)
    low_memory = op_name.endswith("low_memory")
    units = {SAMPLE: shape[0], CHANNEL: shape[0] * shape[1]}.get(granularity, x.numel())
    whole_bits = None if low_memory else unit_bits(whole_saved, units)
    grad = torch.randn(shape, dtype=dtype)
    for dim in dims:
        size = shape[dim]
        for lo, hi in [(0, 1), (1, size - 1), (size // 2, size), (0, size), (2, 2)]:
            shard = block_shard(shape, dim, lo, hi, granularity)
            block_bias = bias[lo:hi] if op_name == "bias_dropout_add" and dim == len(shape) - 1 else bias
            out, saved = run_op(op_name, narrowed(x, dim, lo, hi), narrowed(residual, dim, lo, hi), block_bias,
                                shard=shard)
            where = f"{op_name} dim {dim} [{lo}, {hi}) shard {shard}"
            assert torch.equal(out, narrowed(whole_out, dim, lo, hi)), where
            if low_memory:
                if out.numel() > 0:  # an empty shard has no bits to draw again: its rng_state stays (0, 0)
                    assert torch.equal(saved, whole_saved), where  # the same stream: (seed, offset)
                g = ops.dropout_low_memory_backward(narrowed(grad, dim, lo, hi), saved, P, shard=shard)
                expected = ops.dropout_low_memory_backward(grad, whole_saved, P)
                assert torch.equal(g, narrowed(expected, dim, lo, hi)), where
                continue
            if granularity == SAMPLE:
                expected_bits = whole_bits[lo:hi] if dim == 0 else whole_bits
            elif granularity == CHANNEL:
                grid = whole_bits.view(shape[0], shape[1])
                expected_bits = narrowed(grid, dim, lo, hi).flatten() if dim < 2 else grid.flatten()
            else:
                expected_bits = narrowed(whole_bits.view(shape), dim, lo, hi).flatten()
            assert torch.equal(unit_bits(saved, expected_bits.numel()), expected_bits), where
            assert padding_is_zero(saved, expected_bits.numel()), where


@pytest.mark.parametrize("op_name, granularity", [("dropout_", ELEMENT), ("channel_dropout_", CHANNEL)])
def test_in_place_ops_on_a_block(op_name, granularity):
    x = torch.randn(4, 10, 3, 3)
    whole = x.clone()
    whole_mask = in_place(op_name, whole, P, seed=SEED, offset=OFFSET)[1]
    for dim, (lo, hi) in [(0, (1, 3)), (1, (5, 10)), (3, (0, 2))]:
        block = x.narrow(dim, lo, hi - lo).clone()  # a copy: x stays the whole call's input
        mask = in_place(op_name, block, P, seed=SEED, offset=OFFSET,
                        shard=block_shard(x.shape, dim, lo, hi, granularity))[1]
        assert torch.equal(block, narrowed(whole, dim, lo, hi))
        if granularity == ELEMENT:
            expected = narrowed(unit_bits(whole_mask, x.numel()).view(x.shape), dim, lo, hi).flatten()
            assert torch.equal(unit_bits(mask, block.numel()), expected)


# --- the generator ---------------------------------------------------------------------


def test_shards_drawn_from_the_generator_draw_the_whole_calls_mask():
    x = torch.randn(12, 40)
    torch.manual_seed(7)
    whole = regdrop_ext.dropout(x, P)
    for lo, hi in [(0, 5), (5, 12)]:
        torch.manual_seed(7)
        out, _ = ops.dropout(x[lo:hi].contiguous(), P, shard=unit_shard(x.shape, (lo, 0), (hi - lo, 40), ELEMENT))
        assert torch.equal(out, whole[lo:hi])


@pytest.mark.parametrize("op_name", ["dropout", "drop_path", "channel_dropout", "dropout_low_memory"])
def test_an_empty_shard_takes_its_stream_as_the_whole_call_does(op_name):
    """Ranks whose shard is empty must stay in step with the others."""
    empty = torch.empty(0, 4, 3)
    torch.manual_seed(3)
    getattr(ops, op_name)(torch.ones(2, 4, 3), P)
    after_a_call = torch.get_rng_state()
    torch.manual_seed(3)
    getattr(ops, op_name)(empty, P, shard=(2, 1, 1))
    assert torch.equal(torch.get_rng_state(), after_a_call)


def test_an_empty_call_that_is_not_a_shard_draws_nothing():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    ops.dropout(torch.empty(0), P)
    assert torch.equal(torch.get_rng_state(), before)


# --- refusals, fake kernels, compile ---------------------------------------------------

BAD_SHARDS = [
    ([1, 2], "shard must be \\(first, run, stride\\)"),
    ([0, 0, 1], "run >= 1"),
    ([-1, 4, 4], "first >= 0"),
    ([0, 4, 3], "stride >= run"),
    ([2**62, 1, 2**62], "past 2\\^63 - 1"),
]


@pytest.mark.parametrize("shard, message", BAD_SHARDS, ids=[m for _, m in BAD_SHARDS])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_shards_are_refused_alike_by_the_kernels_and_the_fake_kernels(shard, message, device):
    x = torch.ones(4, device=device)
    with pytest.raises(ValueError, match=message):
        ops.dropout(x, P, seed=1, shard=shard)
    with pytest.raises(ValueError, match=message):
        ops.dropout_low_memory_backward(x, torch.zeros(2, dtype=torch.long, device=device), P, shard=shard)


def test_sharded_calls_pass_opcheck():
    x = torch.randn(6, 8)
    for op, args in [(ops.dropout.default, (x, P)), (ops.drop_path.default, (x, P)),
                     (ops.dropout_add.default, (x, torch.randn(6, 8), P))]:
        torch.library.opcheck(op, args, {"seed": 3, "shard": [5, 8, 20]})


def test_sharded_calls_compile_to_the_eager_result():
    x = torch.randn(6, 8)

    def f(t):
        out, _ = ops.dropout(t, P, seed=3, shard=[5, 8, 20])
        return out * 2

    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def test_vmap_refuses_a_sharded_call():
    with pytest.raises(RuntimeError, match="does not batch a shard"):
        torch.func.vmap(lambda t: ops.dropout(t, P, seed=1, shard=[0, 4, 4])[0])(torch.ones(3, 4))


def test_autograd_of_a_sharded_low_memory_call_draws_the_shards_bits_again():
    x = torch.randn(10, 16)
    shard = unit_shard(x.shape, (0, 8), (10, 8), ELEMENT)
    block = x[:, 8:].contiguous().requires_grad_()
    out, _ = ops.dropout_low_memory(block, P, seed=SEED, offset=OFFSET, shard=shard)
    out.backward(torch.ones_like(out))
    whole = x.clone().requires_grad_()
    whole_out, _ = ops.dropout_low_memory(whole, P, seed=SEED, offset=OFFSET)
    whole_out.backward(torch.ones_like(whole_out))
    assert torch.equal(block.grad, whole.grad[:, 8:])
