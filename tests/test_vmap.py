"""vmap (torch.func.vmap) of the regdrop ops: the batching rules of
regdrop_ext/batching.py, held to what its docstring promises.

* randomness="error" (vmap's default) refuses every random call, with
  torch's own message; a call with an explicit seed is not random and runs.
* "same": one unbatched mask shared by every sample.
* "different": one call of the op over the stacked batch, its mask returned
  as a row per sample.
* An explicit seed: every sample is the op applied to that sample alone.
* Backward ops read an unbatched mask (shared) or a batched one (rows), so
  per-sample gradients (vmap of torch.func.grad, as Opacus computes them)
  are each sample's own gradient under the masks its forward drew.
* Low-memory ops: "same" and seeds, never "different"; in-place ops write
  the batch; the batch dimension can be anywhere.

Element masks under vmap follow each sample's memory order, as the op on
that sample alone does (row-major where a sample is not dense).
Outputs are compared bit for bit with the pure-torch references of
reference.py (half types computed in float32 and rounded once), except
where a summation order differs (bias gradients, per-sample gradients
through matmuls).
"""

import math
from typing import Callable, NamedTuple

import pytest
import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false  # TensorImpl's, from torch
from torch.func import grad, grad_and_value, vmap

import regdrop_ext
from reference import (
    channel_keep,
    element_keep,
    keep_scale,
    masked_reference,
    pack_bits,
    sample_keep,
    unpack_bits,
)
from helpers import assert_rounded_once, call_op, in_place, nonzero_input
from regdrop_ext import manifest

ops = torch.ops.regdrop

# The batching rules lay tensors out whatever their dtype: float32, and
# bfloat16 for its rounding (the kernels' dtypes are test_dropout's).
TEST_DTYPES = [torch.float32, torch.bfloat16]
B = 3  # the batch size of every vmapped call
SEED = {"seed": 21, "offset": 8}
# Per-sample shapes (N, C, L): units per sample (elements, samples N,
# channels N * C) that are not multiples of 8, then ones that all are.
SAMPLE_SHAPES = [(67, 3, 5), (64, 2, 4)]
P_VALUES = [0.5, 0.3]


def shape_id(shape):
    return "x".join(map(str, shape))


def exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# --- the ops, as cases ---------------------------------------------------------------


class Case(NamedTuple):
    units: str  # what one mask bit covers: "element", "rows" (elements, row-major), "sample" or "channel"
    call: Callable  # call(x, residual, bias, p, **rng) -> (output, mask)
    residual: bool = False
    bias: bool = False
    scale_by_keep: bool = True


FORWARD = {
    "dropout": Case("element", lambda x, r, b, p, **k: ops.dropout(x, p, **k)),
    "dropout_add": Case("element", lambda x, r, b, p, **k: ops.dropout_add(x, r, p, **k), residual=True),
    "bias_dropout_add": Case(
        "rows", lambda x, r, b, p, **k: ops.bias_dropout_add(x, b, r, p, **k), residual=True, bias=True
    ),
    "drop_path": Case("sample", lambda x, r, b, p, **k: ops.drop_path(x, p, True, **k)),
    "drop_path_unscaled": Case(
        "sample", lambda x, r, b, p, **k: ops.drop_path(x, p, False, **k), scale_by_keep=False
    ),
    "drop_path_add": Case("sample", lambda x, r, b, p, **k: ops.drop_path_add(x, r, p, True, **k), residual=True),
    "channel_dropout": Case("channel", lambda x, r, b, p, **k: ops.channel_dropout(x, p, **k)),
}

# The random ops that FORWARD lacks, with the same call signature: in place
# (returning the written input and the mask) and low-memory.
INPLACE = {
    "dropout_": Case("element", lambda x, r, b, p, **k: in_place("dropout_", x, p, **k)),
    "channel_dropout_": Case("channel", lambda x, r, b, p, **k: in_place("channel_dropout_", x, p, **k)),
}
LOW_MEMORY = {
    "dropout_low_memory": Case("element", lambda x, r, b, p, **k: ops.dropout_low_memory(x, p, **k)),
    "dropout_add_low_memory": Case(
        "element", lambda x, r, b, p, **k: ops.dropout_add_low_memory(x, r, p, **k), residual=True
    ),
}
EVERY_RANDOM_OP = {**FORWARD, **INPLACE, **LOW_MEMORY}


def unit_count(units, shape):
    return {"element": math.prod(shape), "rows": math.prod(shape), "sample": shape[0],
            "channel": shape[0] * shape[1]}[units]


def nbytes(units):
    return (units + 7) // 8


def keep_flags(units, mask, sample):
    """Keep flags shaped like ``sample``; element bits in its memory order
    (row-major where it is not dense, as the op walks a contiguous copy)."""
    if units in ("element", "rows"):  # bias_dropout_add walks rows: row-major, always
        dense = units == "element" and is_non_overlapping_and_dense_or_false(sample)
        return element_keep(mask, sample if dense else torch.empty(sample.shape, device=sample.device))
    return (sample_keep if units == "sample" else channel_keep)(mask, sample)


def case_scale(case, p):
    scale = keep_scale(p)
    return scale if case.scale_by_keep else float(scale > 0)


def expected_output(case, p, mask, x, r, b):
    """One sample's output under ``mask``, from the reference epilogue."""
    return masked_reference(
        x, keep_flags(case.units, mask, x), case_scale(case, p),
        residual=r if case.residual else None, bias=b if case.bias else None,
    )


def stacked(units, t):
    """The batch as ONE call of the op sees it: sample b's units after
    sample b - 1's (for drop-path and channels, the batch merged into N)."""
    return t.contiguous() if units in ("element", "rows") else t.flatten(0, 1)


def split_rows(mask, batch, units):
    """The mask of one call over batch x units units, a packed row per sample."""
    bits = unpack_bits(mask, batch * units).view(batch, units)
    return torch.stack([pack_bits(row.numpy()) for row in bits])


def batch_inputs(shape, dtype, device):
    """A batch of inputs, a batch of residuals and one bias (nonzero values,
    so that a zero output means dropped)."""
    return (
        nonzero_input((B, *shape), dtype, device),
        nonzero_input((B, *shape), dtype, device),
        nonzero_input((shape[-1],), dtype, device),
    )


def generator_state(generator, device):
    if generator is not None:
        return generator.get_state()
    return torch.cuda.get_rng_state() if torch.device(device).type == "cuda" else torch.get_rng_state()


def seeded(generator, device, seed):
    """Seeds ``generator``, or the default generator of ``device``."""
    if generator is None:
        torch.manual_seed(seed)
    else:
        generator.manual_seed(seed)


def rng_args(generator):
    return {} if generator is None else {"generator": generator}


def make_generator(source, device):
    return torch.Generator(device=device) if source == "generator" else None


def assert_rows_differ(rows, units, p):
    """Rows of independent draws: two of them agree on a unit with
    probability (1-p)^2 + p^2 <= 0.58 for p in {0.5, 0.3}, so on all of
    >= 64 units with probability < 0.58^64 < 1e-15."""
    assert units >= 64
    bits = [unpack_bits(row, units) for row in rows]
    for i in range(len(bits)):
        for j in range(i):
            assert not torch.equal(bits[i], bits[j]), f"samples {j} and {i} drew the same mask"


# --- randomness="error" ---------------------------------------------------------------


def torch_randomness_error():
    """The message torch's own random ops raise under vmap's default mode."""
    with pytest.raises(RuntimeError) as info:
        vmap(torch.nn.functional.dropout)(torch.ones(B, 4))
    return str(info.value)


@pytest.mark.parametrize("source", ["default", "generator"])
@pytest.mark.parametrize("name", EVERY_RANDOM_OP)
def test_error_mode_refuses_every_random_op_like_torch(device, name, source):
    """vmap's default randomness="error" refuses a draw from a generator
    (the default one or a given one) with torch's message, before anything
    is drawn or written: the generator and the input are left as they were."""
    x, r, b = batch_inputs((8, 3, 5), torch.float32, device)
    before = x.clone()
    g = make_generator(source, device)
    seeded(g, device, 0)
    state = generator_state(g, device)
    call = EVERY_RANDOM_OP[name].call
    with pytest.raises(RuntimeError, match="randomness") as info:
        vmap(lambda t, s: call(t, s, b, 0.5, **rng_args(g)))(x, r)
    assert str(info.value) == torch_randomness_error()
    assert torch.equal(generator_state(g, device), state)
    assert torch.equal(x, before)


def _bias(t):
    return torch.zeros(t.shape[-1], dtype=t.dtype, device=t.device)


PUBLIC = {
    "dropout": lambda t: regdrop_ext.dropout(t, 0.5),
    "dropout_inplace": lambda t: regdrop_ext.dropout(t.clone(), 0.5, inplace=True),
    "dropout_low_memory": lambda t: regdrop_ext.dropout(t, 0.5, low_memory=True),
    "drop_path": lambda t: regdrop_ext.drop_path(t, 0.5, training=True),
    "dropout1d": lambda t: regdrop_ext.dropout1d(t, 0.5),
    "dropout2d": lambda t: regdrop_ext.dropout2d(t[None], 0.5),
    "dropout2d_inplace": lambda t: regdrop_ext.dropout2d(t[None].clone(), 0.5, inplace=True),
    "dropout3d": lambda t: regdrop_ext.dropout3d(t[None, None], 0.5),
    "dropout_add": lambda t: regdrop_ext.dropout_add(t, t, 0.5),
    "dropout_add_low_memory": lambda t: regdrop_ext.dropout_add(t, t, 0.5, low_memory=True),
    "bias_dropout_add": lambda t: regdrop_ext.bias_dropout_add(t, _bias(t), t, 0.5),
    "drop_path_add": lambda t: regdrop_ext.drop_path_add(t, t, 0.5),
    "Dropout": lambda t: regdrop_ext.Dropout(0.5)(t),
    "Dropout2d": lambda t: regdrop_ext.Dropout2d(0.5)(t[None]),
    "DropPath": lambda t: regdrop_ext.DropPath(0.5)(t),
    "DropoutAdd": lambda t: regdrop_ext.DropoutAdd(0.5)(t, t),
    "BiasDropoutAdd": lambda t: regdrop_ext.BiasDropoutAdd(0.5)(t, _bias(t), t),
    "DropPathAdd": lambda t: regdrop_ext.DropPathAdd(0.5)(t, t),
}


@pytest.mark.parametrize("name", PUBLIC)
def test_error_mode_refuses_the_public_functions_and_modules(device, name):
    """The functional layer and the modules reach the same rules: a training
    call under vmap's default mode raises torch's randomness error."""
    x = nonzero_input((B, 8, 3, 5), torch.float32, device)
    with pytest.raises(RuntimeError, match="randomness") as info:
        vmap(PUBLIC[name])(x)
    assert str(info.value) == torch_randomness_error()


def test_error_mode_allows_calls_that_draw_nothing(device):
    """Not training, p == 0 and drop_path's default training=False draw no
    randomness: vmap's default mode runs them, and they return the input."""
    x = nonzero_input((B, 8, 3, 5), torch.float32, device)
    for f in (
        lambda t: regdrop_ext.dropout(t, 0.5, training=False),
        lambda t: regdrop_ext.dropout(t, 0.0),
        lambda t: regdrop_ext.drop_path(t, 0.5),
        lambda t: regdrop_ext.dropout2d(t[None], 0.5, training=False)[0],
        lambda t: regdrop_ext.Dropout(0.5).eval()(t),
    ):
        exact(vmap(f)(x), x)


def test_error_mode_refuses_a_random_op_on_an_unbatched_tensor(device):
    """torch refuses F.dropout(u) inside vmap's default mode even when u is
    not batched (a draw is a draw); the regdrop ops should too."""
    u = torch.ones(64, device=device)
    x = torch.ones(B, 64, device=device)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda t: torch.nn.functional.dropout(u, 0.5) + 0 * t)(x)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda t: ops.dropout(u, 0.5)[0] + 0 * t)(x)


def test_different_mode_on_an_unbatched_tensor_draws_per_sample(device):
    """torch's F.dropout(u) under randomness="different" draws a mask per
    sample even when u is not batched (e.g. a dropout on a weight, which
    vmap over samples leaves unbatched); so should ops.dropout. With 64
    units and p = 0.5, three samples share a mask with probability 2^-127."""
    u = torch.ones(64, device=device)
    x = torch.ones(B, 64, device=device)
    theirs = vmap(lambda t: torch.nn.functional.dropout(u, 0.5) + 0 * t, randomness="different")(x)
    assert not (torch.equal(theirs[0], theirs[1]) and torch.equal(theirs[0], theirs[2]))
    ours = vmap(lambda t: ops.dropout(u, 0.5)[0] + 0 * t, randomness="different")(x)
    assert not (torch.equal(ours[0], ours[1]) and torch.equal(ours[0], ours[2]))


# --- randomness="same" ------------------------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("shape", SAMPLE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", FORWARD)
def test_same_mode_shares_one_unbatched_mask(device, dtype, name, shape, p):
    """"same": the mask comes back unbatched (out_dims None is accepted),
    ceil(units per sample / 8) bytes, and every sample's output is the
    reference epilogue under that one mask (element bits in the sample's
    row-major order). The mask is not degenerate: all kept or all dropped
    has probability <= 0.7^64 < 1e-9."""
    case = FORWARD[name]
    x, r, b = batch_inputs(shape, dtype, device)
    out, mask = vmap(lambda t, s: case.call(t, s, b, p), randomness="same", out_dims=(0, None))(x, r)
    units = unit_count(case.units, shape)
    assert mask.dtype == torch.uint8 and mask.shape == (nbytes(units),)
    assert out.shape == x.shape and out.dtype == dtype
    assert 0 < int(unpack_bits(mask, units).sum()) < units
    for i in range(B):
        exact(out[i], expected_output(case, p, mask, x[i], r[i], b))


# --- randomness="different" -------------------------------------------------------------


@pytest.mark.parametrize("source", ["default", "generator"])
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("shape", SAMPLE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", FORWARD)
def test_different_mode_is_one_call_over_the_stacked_batch(device, dtype, name, shape, p, source):
    """"different": from the same generator state, the vmapped call gives
    the output of ONE call of the op over the stacked batch, bit for bit, and
    leaves the generator where that call does; its mask comes back as a row
    of ceil(units / 8) bytes per sample, row b being bits b*U .. b*U+U-1 of
    the one call's mask; each sample's output is the reference under its own
    row; and the rows differ (assert_rows_differ gives the bound)."""
    case = FORWARD[name]
    x, r, b = batch_inputs(shape, dtype, device)
    units = unit_count(case.units, shape)
    g = make_generator(source, device)
    rng = rng_args(g)

    seeded(g, device, 5)
    out, masks = vmap(lambda t, s: case.call(t, s, b, p, **rng), randomness="different")(x, r)
    after_vmap = generator_state(g, device)
    seeded(g, device, 5)
    one_out, one_mask = case.call(stacked(case.units, x), stacked(case.units, r), b, p, **rng)
    assert torch.equal(generator_state(g, device), after_vmap)

    exact(out, one_out.view(x.shape))
    assert masks.dtype == torch.uint8 and masks.shape == (B, nbytes(units))
    assert torch.equal(masks.cpu(), split_rows(one_mask, B, units))
    for i in range(B):
        exact(out[i], expected_output(case, p, masks[i], x[i], r[i], b))
    assert_rows_differ(masks, units, p)


# --- explicit seeds -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["error", "same", "different"])
@pytest.mark.parametrize("name", EVERY_RANDOM_OP)
def test_explicit_seed_is_the_per_sample_call_in_every_mode(device, dtype, name, mode):
    """With seed= and offset= a call is not random: in every mode (the
    default "error" included) it runs, every sample's results are those of
    the op on that sample alone with the same (seed, offset), bit for bit,
    the shared mask (or rng_state) comes back unbatched, and the default
    generator is not drawn from. In-place ops write each sample as the
    in-place op on that sample alone does."""
    case = EVERY_RANDOM_OP[name]
    x, r, b = batch_inputs((67, 3, 5), dtype, device)
    state = generator_state(None, device)
    written = x.clone()
    # An in-place op's mask is the argument it writes, made per sample (new_empty under vmap).
    mask_dim = 0 if name in INPLACE else None
    out, second = vmap(lambda t, s: case.call(t, s, b, 0.3, **SEED), randomness=mode, out_dims=(0, mask_dim))(
        written, r
    )
    assert torch.equal(generator_state(None, device), state)
    for i in range(B):
        sample = x[i].clone()
        expected, expected_second = case.call(sample, r[i], b, 0.3, **SEED)
        exact(out[i], expected)
        assert torch.equal(second if mask_dim is None else second[i], expected_second)
        if name in INPLACE:
            exact(written[i], sample)
    if name in LOW_MEMORY:
        assert second.tolist() == [SEED["seed"], SEED["offset"]]


# --- backward ops -----------------------------------------------------------------------


class Backward(NamedTuple):
    units: str
    call: Callable  # call(grad, mask, p) -> grad_input, or (grad_input, grad_bias)
    scale_by_keep: bool = True
    bias: bool = False


BACKWARD = {
    "dropout_backward": Backward("element", lambda g, m, p: ops.dropout_backward(g, m, p)),
    "drop_path_backward": Backward("sample", lambda g, m, p: ops.drop_path_backward(g, m, p, True)),
    "drop_path_backward_unscaled": Backward(
        "sample", lambda g, m, p: ops.drop_path_backward(g, m, p, False), scale_by_keep=False
    ),
    "channel_dropout_backward": Backward("channel", lambda g, m, p: ops.channel_dropout_backward(g, m, p)),
    "bias_dropout_add_backward": Backward(
        "rows", lambda g, m, p: ops.bias_dropout_add_backward(g, m, p), bias=True
    ),
}


def random_mask(units, device, generator):
    """A packed mask of independent p = 1/2 bits (padding bits zero)."""
    return pack_bits((torch.rand(units, generator=generator) < 0.5).numpy()).to(device)


@pytest.mark.parametrize("masks", ["shared", "rows", "rows_batch_last"])
@pytest.mark.parametrize("shape", SAMPLE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", BACKWARD)
def test_backward_ops_read_shared_masks_and_mask_rows(device, dtype, name, shape, masks):
    """A backward op under vmap over a batch of gradients, with one unbatched
    mask (the masks of "same") or a batched one (a row per sample, as
    "different" returns them; also with the batch last in the gradients and
    in the mask, in_dims (-1, 1)): each sample's gradient is the op on that
    sample with its own mask, and the reference epilogue, exactly. The bias
    gradient of bias_dropout_add_backward is the sum of that sample's
    grad_input rows (float tolerance: the summation order differs)."""
    case = BACKWARD[name]
    p = 0.3
    units = unit_count(case.units, shape)
    grads = nonzero_input((B, *shape), dtype, device)
    bits = torch.Generator().manual_seed(3)
    if masks == "shared":
        mask = random_mask(units, device, bits)
        result = vmap(lambda g: case.call(g, mask, p))(grads)
        mask_of = [mask] * B
    else:
        rows = torch.stack([random_mask(units, device, bits) for _ in range(B)])
        if masks == "rows":
            result = vmap(case.call, in_dims=(0, 0, None))(grads, rows, p)
        else:
            batch_last = grads.movedim(0, -1).contiguous(), rows.t().contiguous()
            result = vmap(case.call, in_dims=(-1, 1, None))(*batch_last, p)
        mask_of = list(rows)
    grad_input, grad_bias = result if case.bias else (result, None)
    assert grad_input.shape == grads.shape
    for i in range(B):
        keep = keep_flags(case.units, mask_of[i], grads[i])
        exact(grad_input[i], masked_reference(grads[i], keep, case_scale(case, p)))
        alone = case.call(grads[i], mask_of[i], p)
        if case.bias:
            exact(grad_input[i], alone[0])
            compute = torch.float64 if dtype == torch.float64 else torch.float32
            assert_rounded_once(grad_bias[i], masked_reference(grads[i].to(compute), keep, case_scale(case, p)))
        else:
            exact(grad_input[i], alone)


def test_bias_dropout_add_backward_of_1d_samples(device):
    """A sample of shape (H,) (an MLP's activation, vmapped over samples)
    has a bias gradient equal to its grad_input. Both the op under vmap and
    the per-sample gradient of bias_dropout_add reach this case."""
    p, h = 0.5, 16
    grads = nonzero_input((B, h), torch.float32, device)
    mask = random_mask(h, device, torch.Generator().manual_seed(0))
    grad_input, grad_bias = vmap(lambda g: ops.bias_dropout_add_backward(g, mask, p))(grads)
    exact(grad_bias, grad_input)

    bias = nonzero_input((h,), torch.float32, device)
    torch.manual_seed(4)
    per_sample = vmap(grad(lambda b, t: regdrop_ext.bias_dropout_add(t, b, t, p).sum()),
                      in_dims=(None, 0), randomness="different")(bias, grads)
    torch.manual_seed(4)  # the same draw: one call over the stacked batch, a row of bits per sample
    rows = split_rows(ops.dropout(grads, p)[1], B, h)
    for i in range(B):
        exact(per_sample[i], masked_reference(torch.ones(h, device=device), unpack_bits(rows[i], h).to(device),
                                              keep_scale(p)))


@pytest.mark.parametrize("states", ["shared", "rows"])
def test_low_memory_backward_op_reads_shared_and_per_sample_rng_states(device, dtype, states):
    """dropout_low_memory_backward under vmap: with one unbatched rng_state
    (as "same" returns it) or a row of (seed, offset) per sample, each
    sample's gradient is the op on that sample alone, and the reference
    under the mask that (seed, offset) draws."""
    p = 0.3
    grads = nonzero_input((B, 67, 3, 5), dtype, device)
    if states == "shared":
        state = torch.tensor([SEED["seed"], SEED["offset"]], device=device)
        result = vmap(lambda g: ops.dropout_low_memory_backward(g, state, p))(grads)
        state_of = [state] * B
    else:
        rows = torch.tensor([[21, 8], [22, 8], [21, 12]], device=device)
        result = vmap(ops.dropout_low_memory_backward, in_dims=(0, 0, None))(grads, rows, p)
        state_of = list(rows)
    for i in range(B):
        seed, offset = state_of[i].tolist()
        mask = ops.dropout(grads[i], p, seed=seed, offset=offset)[1]
        exact(result[i], masked_reference(grads[i], keep_flags("element", mask, grads[i]), keep_scale(p)))
        exact(result[i], ops.dropout_low_memory_backward(grads[i], state_of[i], p))
    if states == "rows":
        assert not torch.equal(result[0], result[1]) and not torch.equal(result[0], result[2])


# --- per-sample gradients (Opacus) ---------------------------------------------------------

T, D, H = 9, 8, 16  # tokens per sample, input and hidden widths


def model(params, x, y, layers):
    """A small residual model over one sample of T tokens; ``layers`` holds
    its random layers (regdrop_ext's functions, or stand-ins)."""
    h = torch.tanh(x @ params["w1"])
    h = layers.dropout(h, 0.5)
    h = layers.dropout_add(h @ params["w2"], h, 0.25)
    h = layers.drop_path(h, 0.5)  # a unit per token
    h = layers.bias_dropout_add(h @ params["w2"], params["b"], h, 0.1)
    h = layers.dropout1d(h.reshape(T, 4, 4), 0.5).reshape(T, H)  # a unit per (token, channel)
    h = layers.drop_path_add(torch.tanh(h), h, 0.3)
    return ((h @ params["w_out"] - y) ** 2).mean()


class Public:
    """The random layers as a user writes them: regdrop_ext's functions."""

    dropout = staticmethod(lambda h, p: regdrop_ext.dropout(h, p))
    dropout_add = staticmethod(lambda x, r, p: regdrop_ext.dropout_add(x, r, p))
    drop_path = staticmethod(lambda h, p: regdrop_ext.drop_path(h, p, training=True))
    bias_dropout_add = staticmethod(lambda x, b, r, p: regdrop_ext.bias_dropout_add(x, b, r, p))
    dropout1d = staticmethod(lambda h, p: regdrop_ext.dropout1d(h, p))
    drop_path_add = staticmethod(lambda x, r, p: regdrop_ext.drop_path_add(x, r, p))


class Recorder:
    """The same draws through the ops, keeping the masks to return them from
    vmap: from the same generator state they are the masks Public drew."""

    def __init__(self):
        self.masks = []

    def _keep(self, result):
        self.masks.append(result[1])
        return result[0]

    def dropout(self, h, p):
        return self._keep(ops.dropout(h, p))

    def dropout_add(self, x, r, p):
        return self._keep(ops.dropout_add(x, r, p))

    def drop_path(self, h, p):
        return self._keep(ops.drop_path(h, p, True))

    def bias_dropout_add(self, x, b, r, p):
        return self._keep(ops.bias_dropout_add(x, b, r, p))

    def dropout1d(self, h, p):
        return self._keep(ops.channel_dropout(h, p))

    def drop_path_add(self, x, r, p):
        return self._keep(ops.drop_path_add(x, r, p, True))


class Replay:
    """Pure torch under given masks: one sample's model under the masks the
    vmapped forward drew for it (element bits in row-major order)."""

    def __init__(self, masks):
        self.masks = iter(masks)

    def _apply(self, units, x, p):
        keep = keep_flags(units, next(self.masks), x.detach())
        return torch.where(keep, x * keep_scale(p), torch.zeros((), dtype=x.dtype, device=x.device))

    def dropout(self, h, p):
        return self._apply("element", h, p)

    def dropout_add(self, x, r, p):
        return r + self._apply("element", x, p)

    def drop_path(self, h, p):
        return self._apply("sample", h, p)

    def bias_dropout_add(self, x, b, r, p):
        return r + self._apply("element", x + b, p)

    def dropout1d(self, h, p):
        return self._apply("channel", h, p)

    def drop_path_add(self, x, r, p):
        return r + self._apply("sample", x, p)


def recorded_masks(params, x, y):
    layers = Recorder()
    model(params, x, y, layers)
    return tuple(layers.masks)


@pytest.mark.parametrize("mode", ["same", "different"])
def test_per_sample_gradients_are_each_samples_own(device, mode):
    """The Opacus use case: vmap(grad(loss), in_dims=(None, 0, 0)) over a
    model built from regdrop_ext's functions gives, for every sample, the
    gradient torch.autograd computes for that sample alone under the masks
    the vmapped forward drew (recorded by the same forward, through the ops,
    from the same generator state); the losses too. float64; the matmuls
    of vmap and of one sample may add in another order, hence assert_close.
    "same" draws one mask for all samples; "different" a mask per sample."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64, "device": device}
    params = {
        "w1": torch.randn(D, H, **f64) * 0.5,
        "w2": torch.randn(H, H, **f64) * 0.3,
        "b": torch.randn(H, **f64),
        "w_out": torch.randn(H, 1, **f64),
    }
    x = torch.randn(B, T, D, **f64)
    y = torch.randn(B, T, 1, **f64)

    torch.manual_seed(11)
    grads, losses = vmap(grad_and_value(lambda *a: model(*a, Public)), in_dims=(None, 0, 0), randomness=mode)(
        params, x, y
    )
    torch.manual_seed(11)
    masks = vmap(recorded_masks, in_dims=(None, 0, 0), randomness=mode)(params, x, y)

    for i in range(B):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = model(leaves, x[i], y[i], Replay([m[i] for m in masks]))
        expected = torch.autograd.grad(loss, list(leaves.values()))
        torch.testing.assert_close(losses[i], loss.detach())
        for k, e in zip(leaves, expected):
            torch.testing.assert_close(grads[k][i], e, msg=lambda m, k=k: f"sample {i}, {k}: {m}")
    first = masks[0]  # the first dropout: 9 x 16 = 144 element units per sample
    if mode == "same":
        assert all(torch.equal(m[0], m[i]) for m in masks for i in range(B))
    else:
        assert_rows_differ(first, T * H, 0.5)


DOUBLE = {
    "dropout": Case("element", lambda t, p: ops.dropout(t, p)),
    "drop_path": Case("sample", lambda t, p: ops.drop_path(t, p, True)),
    "channel_dropout": Case("channel", lambda t, p: ops.channel_dropout(t, p)),
    "dropout_low_memory": Case("element", lambda t, p: ops.dropout_low_memory(t, p)),
}


@pytest.mark.parametrize(
    "name, mode", [(n, m) for n in DOUBLE for m in ("same", "different") if (n, m) != ("dropout_low_memory", "different")]
)
def test_grad_of_grad_per_sample(device, name, mode):
    """Double backward under vmap: f(t) = sum(y * t^2), y = dropout(t), has
    d/dt sum(df/dt) = 6 * keep * s * t; its part 2 * keep * s * t comes from
    the backward op's own gradient (the mask applied to ones), so a double
    backward that skipped the mask would be nonzero where units are dropped.
    Checked per sample against the masks the same forward drew. The
    low-memory op's mask is the one its (seed, offset) draws; it has no
    "different" mode."""
    case, p = DOUBLE[name], 0.5
    x = torch.randn(B, 10, 4, 3, dtype=torch.float64, device=device)

    def f(t):
        return (case.call(t, p)[0] * t**2).sum()

    torch.manual_seed(3)
    second = vmap(grad(lambda t: grad(f)(t).sum()), randomness=mode)(x)
    torch.manual_seed(3)
    _, masks = vmap(lambda t: case.call(t, p), randomness=mode)(x)
    for i in range(B):
        mask = masks[i]
        if name == "dropout_low_memory":
            seed, offset = mask.tolist()
            mask = ops.dropout(x[i], p, seed=seed, offset=offset)[1]
        keep = keep_flags(case.units, mask, x[i])
        assert 0 < int(keep.sum()) < keep.numel()
        torch.testing.assert_close(second[i], torch.where(keep, 6 * keep_scale(p) * x[i], 0.0))


# --- low-memory ops -----------------------------------------------------------------------


LOW_MEMORY_PUBLIC = {
    "dropout": lambda t: regdrop_ext.dropout(t, 0.5, low_memory=True),
    "dropout_add": lambda t: regdrop_ext.dropout_add(t, t, 0.5, low_memory=True),
    "Dropout": lambda t: regdrop_ext.Dropout(0.5, low_memory=True)(t),
    "DropoutAdd": lambda t: regdrop_ext.DropoutAdd(0.5, low_memory=True)(t, t),
}


@pytest.mark.parametrize("name", [*LOW_MEMORY, *LOW_MEMORY_PUBLIC])
def test_low_memory_refuses_different(device, name):
    """An rng_state cannot say where each sample's units start in one
    stream: randomness="different" raises, naming low-memory dropout, and
    draws nothing."""
    x = nonzero_input((B, 8, 5), torch.float32, device)
    f = LOW_MEMORY_PUBLIC.get(name) or (lambda t: LOW_MEMORY[name].call(t, t, None, 0.5))
    state = generator_state(None, device)
    with pytest.raises(RuntimeError, match="low-memory"):
        vmap(f, randomness="different")(x)
    assert torch.equal(generator_state(None, device), state)


@pytest.mark.parametrize("source", ["default", "generator"])
@pytest.mark.parametrize("name", LOW_MEMORY)
def test_low_memory_same_is_the_per_sample_call_of_its_rng_state(device, dtype, name, source):
    """"same": the rng_state comes back unbatched, an int64 (seed, offset),
    and every sample's output is the masked op on that sample alone with
    seed=seed, offset=offset; a second call draws another stream."""
    case = LOW_MEMORY[name]
    masked = FORWARD["dropout_add" if case.residual else "dropout"]
    x, r, _ = batch_inputs((67, 3, 5), dtype, device)
    g = make_generator(source, device)
    seeded(g, device, 2)
    f = vmap(lambda t, s: case.call(t, s, None, 0.3, **rng_args(g)), randomness="same", out_dims=(0, None))
    out, rng_state = f(x, r)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    seed, offset = rng_state.tolist()
    for i in range(B):
        expected, mask = masked.call(x[i], r[i], None, 0.3, seed=seed, offset=offset)
        exact(out[i], expected)
        assert 0 < int(unpack_bits(mask, x[i].numel()).sum()) < x[i].numel()
    assert not torch.equal(f(x, r)[1], rng_state)


@pytest.mark.parametrize("name", LOW_MEMORY)
def test_low_memory_per_sample_gradients_with_same(device, dtype, name):
    """vmap(grad) through a low-memory op with randomness="same": the
    input's gradient is each sample's weights through the mask that the
    returned (seed, offset) draws, and the residual's is the weights."""
    case = LOW_MEMORY[name]
    p = 0.3
    x, r, _ = batch_inputs((67, 3, 5), dtype, device)
    w = nonzero_input((B, 67, 3, 5), dtype, device)

    def loss(t, s, weights):
        return (case.call(t, s, None, p)[0] * weights).sum()

    torch.manual_seed(4)
    grad_x, grad_r = vmap(grad(loss, argnums=(0, 1)), randomness="same")(x, r, w)
    torch.manual_seed(4)
    _, rng_state = vmap(lambda t, s: case.call(t, s, None, p), randomness="same", out_dims=(0, None))(x, r)
    seed, offset = rng_state.tolist()
    for i in range(B):
        mask = ops.dropout(x[i], p, seed=seed, offset=offset)[1]
        exact(grad_x[i], masked_reference(w[i], keep_flags("element", mask, x[i]), keep_scale(p)))
        if case.residual:
            exact(grad_r[i], w[i])
        else:
            assert torch.equal(grad_r[i], torch.zeros_like(w[i]))


# --- in place -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["batch_first", "batch_sliced", "batch_last"])
@pytest.mark.parametrize("mode", ["same", "different"])
@pytest.mark.parametrize("name", INPLACE)
def test_inplace_ops_write_the_batch(device, dtype, name, mode, layout):
    """An in-place op under vmap writes every sample of the batched input in
    place, each as the reference under the returned mask (a row per sample:
    the mask it writes is made per sample, by new_empty; with "same" every
    row is the one shared mask); memory outside the batched view is untouched. With "different" and the batch first the result is
    the in-place op on the stacked batch, from the same generator state."""
    case, p = INPLACE[name], 0.3
    shape = (67, 3, 5)
    if layout == "batch_last":
        base = nonzero_input((*shape, B), dtype, device)
        view, in_dim = base, -1
    elif layout == "batch_sliced":  # not contiguous: the op writes a copy back
        base = nonzero_input((B, 69, 3, 5), dtype, device)
        view, in_dim = base[:, :67], 0
    else:
        base = nonzero_input((B, *shape), dtype, device)
        view, in_dim = base, 0
    before = base.clone()
    samples = [s.clone() for s in view.movedim(in_dim, 0)]

    torch.manual_seed(6)
    mask = vmap(lambda t: case.call(t, None, None, p)[1], in_dims=in_dim, randomness=mode)(view)
    units = unit_count(case.units, shape)
    assert mask.shape == (B, nbytes(units))
    if mode == "same":
        assert all(torch.equal(row, mask[0]) for row in mask)
    written = view.movedim(in_dim, 0)
    for i in range(B):
        exact(written[i], masked_reference(samples[i], keep_flags(case.units, mask[i], samples[i]), keep_scale(p)))
    if layout == "batch_sliced":
        exact(base[:, 67:], before[:, 67:])
    if mode == "different":
        assert_rows_differ(mask, units, p)
        if layout == "batch_first":
            again = before.clone()
            torch.manual_seed(6)
            one_mask = case.call(stacked(case.units, again), None, None, p)[1]
            exact(base, again)
            assert torch.equal(mask.cpu(), split_rows(one_mask, B, units))


INPLACE_PUBLIC = {
    "dropout": ("dropout_", (67, 3, 5), lambda t: regdrop_ext.dropout(t, 0.3, inplace=True)),
    "Dropout": ("dropout_", (67, 3, 5), lambda t: regdrop_ext.Dropout(0.3, inplace=True)(t)),
    "dropout2d": ("channel_dropout_", (8, 9, 3, 2), lambda t: regdrop_ext.dropout2d(t, 0.3, inplace=True)),
    "dropout1d_unbatched": ("channel_dropout_", (72, 5), lambda t: regdrop_ext.dropout1d(t, 0.3, inplace=True)),
}


@pytest.mark.parametrize("mode", ["same", "different"])
@pytest.mark.parametrize("name", INPLACE_PUBLIC)
def test_public_inplace_calls_write_the_batch(device, dtype, name, mode):
    """regdrop_ext.dropout(inplace=True), the Dropout module, dropout2d and
    dropout1d (an unbatched (C, L) sample, which it unsqueezes) under vmap
    return the batched input itself, written as the in-place op writes it
    from the same generator state."""
    op, shape, f = INPLACE_PUBLIC[name]
    case = INPLACE[op]
    x = nonzero_input((B, *shape), dtype, device)
    y = x.clone()
    torch.manual_seed(7)
    out = vmap(f, randomness=mode)(x)
    torch.manual_seed(7)
    as_op = (lambda t: case.call(t[None], None, None, 0.3)[1]) if name == "dropout1d_unbatched" else (
        lambda t: case.call(t, None, None, 0.3)[1])
    vmap(as_op, randomness=mode)(y)
    exact(x, y)
    exact(out, x)
    assert bool((x == 0).any()) and bool((x != 0).any())  # >= 72 units: none dropped with p <= 0.7^72


INPLACE_GRAD = {
    "dropout": ("dropout_", lambda t: regdrop_ext.dropout(t, 0.3, inplace=True)),
    "dropout2d": ("channel_dropout_", lambda t: regdrop_ext.dropout2d(t, 0.3, inplace=True)),
}


@pytest.mark.parametrize("mode", ["same", "different"])
@pytest.mark.parametrize("name", INPLACE_GRAD)
def test_per_sample_gradients_through_inplace_calls(device, name, mode):
    """vmap(grad) through an in-place call on an intermediate (t * 1, as
    after a layer): each sample's gradient is its weights through the mask
    the in-place op draws from the same generator state."""
    op, f = INPLACE_GRAD[name]
    case = INPLACE[op]
    x = nonzero_input((B, 8, 9, 3, 2), torch.float32, device)
    w = nonzero_input((B, 8, 9, 3, 2), torch.float32, device)
    torch.manual_seed(13)
    grads = vmap(grad(lambda t, v: (f(t * 1) * v).sum()), randomness=mode)(x, w)
    torch.manual_seed(13)
    masks = vmap(lambda t: case.call(t.clone(), None, None, 0.3)[1], randomness=mode)(x)
    for i in range(B):
        exact(grads[i], masked_reference(w[i], keep_flags(case.units, masks[i], x[i]), keep_scale(0.3)))
    if mode == "different":
        assert_rows_differ(masks, unit_count(case.units, x.shape[1:]), 0.3)


@pytest.mark.parametrize("mode", ["error", "same", "different"])
@pytest.mark.parametrize("name", INPLACE)
def test_inplace_op_on_an_unbatched_tensor_follows_torch(device, name, mode):
    """An in-place draw into a tensor that vmap does not batch cannot hold a
    sample's own result: as torch's in-place random ops, "error" and
    "different" refuse it, leaving the tensor as it was, and "same" draws
    one mask into it, for every sample."""
    u = nonzero_input((8, 3, 5), torch.float32, device)
    before = u.clone()
    x = torch.ones(B, 2, device=device)
    f = lambda t: INPLACE[name].call(u, None, None, 0.5)[1].sum() + t  # noqa: E731
    if mode == "same":
        vmap(f, randomness=mode)(x)
        assert not torch.equal(u, before) and torch.equal(u == 0, (u * 0 == 0) & (u == 0))
        return
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(f, randomness=mode)(x)
    exact(u, before)


# --- bias_dropout_add with a bias per sample ------------------------------------------------


@pytest.mark.parametrize("bias_dim", [0, 1])
@pytest.mark.parametrize("mode", ["same", "different", "seed"])
@pytest.mark.parametrize("shape", [(67, 3, 5), (4, 16)], ids=shape_id)
def test_bias_dropout_add_with_a_batched_bias(device, dtype, shape, mode, bias_dim):
    """vmap over the bias too (in_dims 0 for input, bias and residual): each
    sample is residual + (input + its bias) * scale where kept, computed in
    float32 (float64 for float64) and rounded once, under the returned mask
    (shared with "same" and a seed, a row per sample with "different"). With
    "different" the rows are the split mask of one bias_dropout_add call over
    the stacked batch; with a seed each sample is the op on it alone. The
    biases come as rows (in_dims 0) or as columns (in_dims 1)."""
    p = 0.3
    x, r, _ = batch_inputs(shape, dtype, device)
    biases = nonzero_input((B, shape[-1]), dtype, device)
    rng = SEED if mode == "seed" else {}
    randomness = "error" if mode == "seed" else mode
    torch.manual_seed(8)
    out, mask = vmap(lambda t, b, s: ops.bias_dropout_add(t, b, s, p, **rng), in_dims=(0, bias_dim, 0),
                     randomness=randomness, out_dims=(0, 0 if mode == "different" else None))(
        x, biases if bias_dim == 0 else biases.t().contiguous(), r)
    units = math.prod(shape)
    for i in range(B):
        row = mask[i] if mode == "different" else mask
        keep = keep_flags("element", row, x[i])
        exact(out[i], masked_reference(x[i], keep, keep_scale(p), residual=r[i], bias=biases[i]))
        if mode == "seed":
            exact(out[i], ops.bias_dropout_add(x[i], biases[i], r[i], p, **SEED)[0])
    if mode == "different":
        torch.manual_seed(8)
        one_mask = ops.bias_dropout_add(x, biases[0], r, p)[1]
        assert torch.equal(mask.cpu(), split_rows(one_mask, B, units))


# --- where the batch dimension is ---------------------------------------------------------------


def laid_out(x, layout):
    """(the batched tensor as vmap gets it, its in_dim); the samples are
    x[b] whatever the layout."""
    if layout == "batch_middle":
        return x.movedim(0, 1).contiguous(), 1
    if layout == "batch_last":
        return x.movedim(0, -1).contiguous(), -1
    if layout == "permuted_samples":  # each sample dense, not row-major
        return x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1), 0
    if layout == "sliced":
        padded = torch.zeros(x.shape[:-1] + (x.shape[-1] + 3,), dtype=x.dtype, device=x.device)
        padded[..., 1:-2] = x
        return padded[..., 1:-2], 0
    return x, 0


LAYOUTS = ["batch_middle", "batch_last", "permuted_samples", "sliced"]


@pytest.mark.parametrize("out_dim", [0, 1, -1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["same", "different"])
@pytest.mark.parametrize("name", FORWARD)
def test_batch_dimension_anywhere_and_non_contiguous_samples(device, name, mode, layout, out_dim):
    """in_dims other than 0 and samples that are not contiguous: each sample
    is the reference under its mask, element bits in the sample's memory
    order, as the op on the sample alone (row-major where it is not dense);
    where that order is row-major, the call draws exactly what the
    contiguous, batch-first call draws from the same generator state.
    out_dims puts the batch of the output (and of the mask rows of
    "different") where asked."""
    case, p = FORWARD[name], 0.3
    shape = (10, 3, 5)
    x, r, b = batch_inputs(shape, torch.float32, device)
    xl, in_dim = laid_out(x, layout)
    rl, _ = laid_out(r, layout)
    mask_dim = None if mode == "same" else out_dim

    def f(t, s):
        return case.call(t, s, b, p)

    torch.manual_seed(9)
    out, mask = vmap(f, in_dims=in_dim, randomness=mode, out_dims=(out_dim, mask_dim))(xl, rl)
    torch.manual_seed(9)
    expected_out, expected_mask = vmap(f, randomness=mode, out_dims=(0, None if mode == "same" else 0))(x, r)
    out, mask = out.movedim(out_dim, 0), mask if mask_dim is None else mask.movedim(mask_dim, 0)
    if layout != "permuted_samples":  # samples in row-major memory order, or not dense
        exact(out, expected_out)
        assert torch.equal(mask, expected_mask)
    for i in range(B):
        row = mask if mode == "same" else mask[i]
        sample = xl.select(in_dim, i)
        exact(out[i], expected_output(case, p, row, sample, rl.select(in_dim, i), b))


@pytest.mark.parametrize("mode", ["same", "different"])
@pytest.mark.parametrize("layout", ["residual_unbatched", "input_unbatched"])
def test_one_unbatched_operand_is_shared_by_every_sample(device, layout, mode):
    """dropout_add with only one of input and residual batched: the other is
    every sample's, and each sample is the reference under its mask."""
    p = 0.3
    x, r, _ = batch_inputs((10, 3, 5), torch.float32, device)
    in_dims = (0, None) if layout == "residual_unbatched" else (None, 0)
    xs, rs = (x, r[0]) if layout == "residual_unbatched" else (x[0], r)
    torch.manual_seed(10)
    out, mask = vmap(lambda t, s: ops.dropout_add(t, s, p), in_dims=in_dims, randomness=mode,
                     out_dims=(0, None if mode == "same" else 0))(xs, rs)
    for i in range(B):
        xi, ri = (x[i], r[0]) if layout == "residual_unbatched" else (x[0], r[i])
        row = mask if mode == "same" else mask[i]
        exact(out[i], masked_reference(xi, keep_flags("element", row, xi), keep_scale(p), residual=ri))
    if mode == "different":
        assert_rows_differ(mask, 150, p)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["same", "different"])
@pytest.mark.parametrize("name", FORWARD)
def test_per_sample_input_gradients_in_every_layout(device, name, mode, layout):
    """vmap(grad) over a batch laid out in any of the ways above: each
    sample's input gradient is its weights through the mask that the same
    forward draws from the same generator state (the backward ops read the
    saved masks in each sample's order)."""
    case, p = FORWARD[name], 0.3
    x, r, b = batch_inputs((10, 3, 5), torch.float32, device)
    w = nonzero_input((B, 10, 3, 5), torch.float32, device)
    xl, in_dim = laid_out(x, layout)
    rl, _ = laid_out(r, layout)

    def loss(t, s, v):
        return (case.call(t, s, b, p)[0] * v).sum()

    torch.manual_seed(12)
    grads = vmap(grad(loss), in_dims=(in_dim, in_dim, 0), randomness=mode)(xl, rl, w)
    torch.manual_seed(12)
    _, masks = vmap(lambda t, s: case.call(t, s, b, p), in_dims=in_dim, randomness=mode,
                    out_dims=(0, None if mode == "same" else 0))(xl, rl)
    for i in range(B):
        row = masks if mode == "same" else masks[i]
        keep = keep_flags(case.units, row, xl.select(in_dim, i))
        exact(grads[i], masked_reference(w[i], keep, case_scale(case, p)))


@pytest.mark.parametrize("mode", ["same", "different"])
def test_scalar_samples(device, mode):
    """vmap over a 1-D tensor: every sample is 0-d, a single element unit
    (mask rows of one byte with "different"; one byte for all with "same")."""
    x = nonzero_input((200,), torch.float32, device)
    out, mask = vmap(lambda t: ops.dropout(t, 0.5), randomness=mode, out_dims=(0, None if mode == "same" else 0))(x)
    assert mask.shape == ((1,) if mode == "same" else (200, 1))
    if mode == "same":
        keep = unpack_bits(mask, 1).expand(200)
    else:  # bit 0 of each sample's byte
        keep = unpack_bits(mask.reshape(-1), 8 * 200).view(200, 8)[:, 0]
    exact(out, masked_reference(x, keep.to(device), 2.0))
    if mode == "different":
        assert 0 < int(keep.sum()) < 200  # 200 independent p = 1/2 draws


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["dropout", "dropout_add", "bias_dropout_add", "drop_path", "channel_dropout"])
def test_a_seeded_call_is_the_op_on_each_sample_in_any_layout(device, name, layout):
    """A seeded call is deterministic, so vmap(f)(x)[b] must be f(x[b]) bit
    for bit, whatever the samples' layout: element masks follow each
    sample's memory order under vmap as they do for the sample alone."""
    case, p = FORWARD[name], 0.3
    x, r, b = batch_inputs((10, 3, 5), torch.float32, device)
    xl, in_dim = laid_out(x, layout)
    rl, _ = laid_out(r, layout)
    out, mask = vmap(lambda t, s: case.call(t, s, b, p, **SEED), in_dims=in_dim, out_dims=(0, None))(xl, rl)
    for i in range(B):
        alone_out, alone_mask = case.call(xl.select(in_dim, i), rl.select(in_dim, i), b, p, **SEED)
        exact(out[i], alone_out)
        assert torch.equal(mask, alone_mask)


RESIDUAL_OPS = [op for op in manifest.ops("masked", "low_memory") if op.residual]
CHANNELS_LAST_SAMPLES = "channels_last_samples"


def laid_out_samples(x, layout):
    """The batch with its samples in ``layout`` (batch first), or, for
    "unbatched", sample 0 alone (in_dim None)."""
    if layout == CHANNELS_LAST_SAMPLES:  # each sample (C, H, W) channels-last-like: C innermost
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), 0
    if layout == "unbatched":
        return x[0], None
    return laid_out(x, layout)


@pytest.mark.parametrize("r_layout", ["batch_first", "permuted_samples", CHANNELS_LAST_SAMPLES, "sliced", "unbatched"])
@pytest.mark.parametrize("x_layout", ["batch_first", "permuted_samples", CHANNELS_LAST_SAMPLES])
@pytest.mark.parametrize("op", RESIDUAL_OPS, ids=lambda op: op.name)
def test_a_residual_in_another_layout_is_added_element_for_element(op, x_layout, r_layout):
    """Input and residual with different per-sample layouts (or the residual
    unbatched): every sample is the op on that sample alone, bit for bit
    (seeded, so deterministic), in every mode; and each sample's gradient is
    its own. The residual goes through the input's element order."""
    x, r, b = batch_inputs((6, 4, 5), torch.float32, "cpu")
    xl, x_dim = laid_out_samples(x, x_layout)
    rl, r_dim = laid_out_samples(r, r_layout)
    r_of = (lambda i: rl) if r_dim is None else (lambda i: rl.select(r_dim, i))

    def f(t, s):
        return call_op(op, t, 0.3, residual=s, bias=b, **SEED)[0]

    for mode in ("same", "different"):
        out = vmap(f, in_dims=(x_dim, r_dim), randomness=mode)(xl, rl)
        for i in range(B):
            exact(out[i], f(xl.select(x_dim, i), r_of(i)))
    grads = vmap(grad(lambda t, s: (f(t, s) ** 2).sum(), argnums=(0, 1)), in_dims=(x_dim, r_dim))(xl, rl)
    for i in range(B):
        alone = grad(lambda t, s: (f(t, s) ** 2).sum(), argnums=(0, 1))(xl.select(x_dim, i), r_of(i))
        exact(grads[0][i], alone[0])
        if r_dim is not None:
            exact(grads[1][i], alone[1])


@pytest.mark.parametrize("layout", ["batch_first", "permuted_samples", CHANNELS_LAST_SAMPLES, "batch_last"])
def test_low_memory_backward_with_a_stream_per_sample_follows_each_samples_order(layout):
    """A batched rng_state: sample b is the op on grad[b] and rng_state[b]
    alone, in grad[b]'s memory order, whatever its layout."""
    grads, _, _ = batch_inputs((5, 4, 3), torch.float32, "cpu")
    gl, g_dim = laid_out_samples(grads, layout)
    states = torch.tensor([[1, 0], [2, 0], [3, 4]])
    out = vmap(ops.dropout_low_memory_backward, in_dims=(g_dim, 0, None))(gl, states, 0.5)
    for i in range(B):
        exact(out[i], ops.dropout_low_memory_backward(gl.select(g_dim, i), states[i], 0.5))
