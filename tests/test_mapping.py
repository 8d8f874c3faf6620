"""The documented random mapping, against every random op of the manifest.

Which elements an op keeps must be what an independent implementation of the
mapping (reference.py: Philox4x32-10 in NumPy, keep iff u16 >= round(65536 p))
gives for the op's units, numbered as documented: elements in the memory order
of the output (row-major for an op with a bias), samples by their index along
dim 0, channels by n * C + c; and a call with ``shard=(first, run, stride)``
draws its unit i at the larger call's unit first + (i // run) * stride + i % run.
The returned masks hold those bits in unit order, padding bits 0.

Every case compares the op's output with the reference built from the
mapping alone, never with the op's own mask: a wrong stream (seed, offset or
group index), a wrong unit numbering or a wrong shard offset fails here.
"""

import pytest
import torch

from helpers import call_op
from reference import in_larger_call, keep_bits_at, keep_scale, unit_numbers, unpack_bits
from regdrop_ext import manifest
from regdrop_ext.dtensor import unit_shard

SEED, OFFSET, P = 0x1234_5678_9ABC, 12, 0.4
RANDOM_OPS = manifest.ops("masked", "in_place", "low_memory")


def layouts():
    """(name, tensor) of every layout the op walks in its own way: dense
    permutations, channels-last with many and few channels, and non-dense views."""
    base = torch.rand(4, 10, 3, 6) + 0.5  # never 0: a 0 in the output means dropped
    yield "contiguous", base
    yield "channels_last", base.contiguous(memory_format=torch.channels_last)
    yield "channels_last, 3 channels", base[:, :3].contiguous(memory_format=torch.channels_last)
    yield "transposed", base.transpose(0, 2)  # dim 0 is not outermost
    yield "sliced", base[:, :, :, ::2]
    yield "sliced channels_last", base.contiguous(memory_format=torch.channels_last)[..., ::2]


@pytest.mark.parametrize("op", RANDOM_OPS, ids=lambda op: op.name)
def test_every_op_keeps_the_units_the_mapping_keeps(op):
    for layout, x in layouts():
        # A residual and bias of 0 (of the input's layout): a 0 in the output is a dropped element.
        out, saved = call_op(op, x.clone(), P, residual=torch.zeros_like(x), bias=torch.zeros(x.shape[-1]),
                             seed=SEED, offset=OFFSET)
        numbers = unit_numbers(op.unit, out, rows=op.bias)
        expected = keep_bits_at(SEED, OFFSET, numbers.flatten(), P).view(out.shape)
        assert torch.equal(out != 0, expected), f"{op.name}, {layout}"
        assert torch.equal(out[expected], (x[expected] * keep_scale(P)).to(out.dtype)), f"{op.name}, {layout}"
        units = op.units(x.shape)
        if op.variant == "low_memory":
            assert saved.tolist() == [SEED, OFFSET]
        else:
            assert torch.equal(unpack_bits(saved, saved.numel() * 8),
                               torch.cat([keep_bits_at(SEED, OFFSET, range(units), P),
                                          torch.zeros(saved.numel() * 8 - units, dtype=torch.bool)])), op.name


# Blocks of a (6, 10, 12) tensor, as DTensor shards cut it: along each dim.
BLOCKS = [(0, 1, 5), (1, 3, 10), (2, 0, 7), (2, 5, 12), (0, 0, 6)]


@pytest.mark.parametrize("op", RANDOM_OPS, ids=lambda op: op.name)
def test_every_op_on_a_shard_keeps_the_larger_calls_units(op):
    whole = torch.rand(6, 10, 12) + 0.5
    for dim, lo, hi in BLOCKS:
        offsets, local = [0, 0, 0], list(whole.shape)
        offsets[dim], local[dim] = lo, hi - lo
        shard = unit_shard(whole.shape, offsets, local, op.unit)
        x = whole.narrow(dim, lo, hi - lo).contiguous()
        bias = torch.zeros(x.shape[-1])
        out, _ = call_op(op, x.clone(), P, residual=torch.zeros_like(x), bias=bias, seed=SEED, offset=OFFSET,
                         shard=shard)
        numbers = in_larger_call(unit_numbers(op.unit, out, rows=op.bias), shard)
        expected = keep_bits_at(SEED, OFFSET, numbers.flatten(), P).view(out.shape)
        assert torch.equal(out != 0, expected), f"{op.name}, dim {dim} [{lo}, {hi}): shard {shard}"


def test_a_shard_far_into_the_stream():
    """Units past 2^32 and 2^40: the counter's high word."""
    shard = (2**40 + 3, 700, 2**33)
    x = torch.ones(3000)
    out, mask = manifest.OPS["dropout"].op(x, P, seed=SEED, offset=OFFSET, shard=shard)
    numbers = in_larger_call(torch.arange(3000), shard)
    assert torch.equal(out != 0, keep_bits_at(SEED, OFFSET, numbers, P))


def test_a_generator_draws_the_stream_its_rng_state_records():
    """A call without seed= takes (seed, offset) from the generator; the
    low-memory op records it, and its units follow the mapping of that stream."""
    x = torch.rand(1000) + 0.5
    out, state = manifest.OPS["dropout_low_memory"].op(x, P, torch.Generator().manual_seed(3))
    seed, offset = state.tolist()
    assert offset == 0  # the CPU generator gives a fresh seed per call
    assert torch.equal(out != 0, keep_bits_at(seed % 2**64, offset, range(1000), P))
