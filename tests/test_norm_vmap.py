"""vmap (torch.func.vmap) of the norm ops (dropout + residual + LayerNorm /
RMSNorm): the batching rules of regdrop_ext/norm_batching.py, held to what
its docstring promises, with the element family's semantics.

* randomness="error" refuses a call that draws, with torch's message; p == 0
  and eval draw nothing and run.
* "different": one call over the stacked batch (the output, the residual
  stream, the statistics and the generator's state bit for bit), its mask a
  row per sample; also with per-sample parameters, which run per sample.
* "same": every sample is the op on that sample alone from the generator
  state of the call (one draw for all).
* An explicit seed: every sample is the op on that sample alone, in every mode.
* Backward ops: each sample's gradients are the backward op's on that sample
  alone, bit for bit, with a shared or a per-sample mask (or rng_state), with
  and without parameter gradients.
* Per-sample gradients (vmap of torch.func.grad) and tangents (vmap of jvp)
  are each sample's own, bit for bit.
Each sample's residual stream is also checked against the pure-torch
reference under its returned mask (bit for bit), its output against
F.layer_norm / F.rms_norm of that stream.
"""

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import regdrop_ext
from helpers import nonzero_input
from reference import element_keep, keep_scale, masked_reference, sample_keep, unpack_bits

ops = torch.ops.regdrop
B = 3  # the batch size of every vmapped call
SAMPLE = (4, 3, 13)  # a sample: 12 rows of 13 (156 element units, 4 drop-path units)
P = 0.3
SEED = {"seed": 21, "offset": 8}
INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def same_bits(actual, expected, what=""):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    view = INT_VIEW[actual.element_size()]
    assert torch.equal(actual.contiguous().view(view), expected.contiguous().view(view)), what


def same_results(actual, expected, what=""):
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"{what}: output {k}"
        if a is not None:
            same_bits(a, e, f"{what}: output {k}")


class Case(NamedTuple):
    rms: bool = False
    drop_path: bool = False
    residual: bool = True
    input_bias: bool = False
    low_memory: bool = False

    def call(self, x, r, w, b, ib, p=P, **rng):
        """The forward op on one sample (or a batch): its five outputs."""
        residual = r if self.residual else None
        bias = None if self.rms else b
        input_bias = ib if self.input_bias else None
        if self.low_memory:
            return ops.dropout_add_norm_low_memory(x, residual, w, bias, p, 1e-5, self.rms, input_bias, **rng)
        return ops.dropout_add_norm(x, residual, w, bias, p, 1e-5, self.rms, input_bias, self.drop_path, **rng)

    def units(self, shape):
        return shape[0] if self.drop_path else shape.numel()

    def keep(self, mask, sample):
        return (sample_keep if self.drop_path else element_keep)(mask, sample)


CASES = {
    "layer": Case(input_bias=True),
    "rms": Case(rms=True, residual=False),
    "drop_path": Case(drop_path=True),
    "low_memory": Case(input_bias=True, low_memory=True),
}
MASKED = [name for name, case in CASES.items() if not case.low_memory]


def operands(dtype=torch.float32, device="cpu", batched_parameters=False):
    """A batch of inputs and residuals; weight, bias and input bias (one
    for all, or one per sample)."""
    x, r = (nonzero_input((B, *SAMPLE), dtype, device) for _ in range(2))
    shape = (B, SAMPLE[-1]) if batched_parameters else (SAMPLE[-1],)
    w = (torch.rand(shape, device=device) + 0.5).to(dtype)
    b, ib = (nonzero_input(shape, dtype, device) for _ in range(2))
    return x, r, w, b, ib


def in_dims(batched_parameters):
    return (0, 0) + ((0 if batched_parameters else None),) * 3


def parameters_of(params, i, batched_parameters):
    return [t[i] for t in params] if batched_parameters else list(params)


def check_against_the_reference(case, mask, x, r, w, b, ib, results, p=P):
    """A sample's residual stream bit for bit under its mask, its output
    close to the norm of that stream."""
    output, residual_out = results[0], results[1]
    keep = case.keep(mask, x)
    scale = keep_scale(p)
    expected = masked_reference(x, keep, scale, residual=r if case.residual else None,
                                bias=ib if case.input_bias else None)
    same_bits(residual_out, expected, "residual_out")
    s, h = residual_out.float(), (x.shape[-1],)
    norm = F.rms_norm(s, h, w.float(), 1e-5) if case.rms else F.layer_norm(s, h, w.float(), b.float(), 1e-5)
    torch.testing.assert_close(output.float(), norm, rtol=2e-5, atol=2e-5)


def stream(p=P, generator=None):
    """The (seed, offset) that a call draws from the generator's current state (and draws it)."""
    one = torch.zeros(1)
    return ops.dropout_add_norm_low_memory(one, None, None, None, p, generator=generator)[2].tolist()


def torch_randomness_error():
    with pytest.raises(RuntimeError) as info:
        vmap(F.dropout)(torch.ones(B, 4))
    return str(info.value)


# --- randomness="error" -------------------------------------------------------------------

PUBLIC = {
    "dropout_add_layer_norm": lambda t, s, w, b: regdrop_ext.dropout_add_layer_norm(t, s, w, b, P),
    "drop_path_add_rms_norm": lambda t, s, w, b: regdrop_ext.drop_path_add_rms_norm(t, s, w, P),
    "DropoutAddLayerNorm": lambda t, s, w, b: regdrop_ext.DropoutAddLayerNorm(13, P, low_memory=True)(t, s),
}


@pytest.mark.parametrize("name", [*CASES, *PUBLIC])
def test_error_mode_refuses_a_draw_and_runs_calls_that_draw_nothing(name):
    """vmap's default mode refuses every call that draws, with torch's
    message, before drawing; p == 0 and eval draw nothing: they run, each
    sample the op on it alone; a draw on tensors vmap does not batch is
    refused too (the FuncTorchVmapMode kernel)."""
    x, r, w, b, ib = operands()
    f = PUBLIC.get(name) or (lambda t, s, w_, b_: CASES[name].call(t, s, w_, b_, ib)[0])
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError) as info:
        vmap(f, in_dims=(0, 0, None, None))(x, r, w, b)
    assert str(info.value) == torch_randomness_error()
    assert torch.equal(torch.get_rng_state(), state)
    case = CASES.get(name, CASES["layer"])
    quiet = vmap(lambda t, s: case.call(t, s, w, b, ib, p=0.0)[:2])(x, r)
    for i in range(B):
        same_results([o[i] for o in quiet], case.call(x[i], r[i], w, b, ib, p=0.0)[:2], f"p = 0, sample {i}")
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda t: case.call(x[0], r[0], w, b, ib)[0] + 0 * t)(x)
    evaluation = vmap(lambda t, s: regdrop_ext.dropout_add_layer_norm(t, s, w, b, P, training=False))(x, r)
    for i in range(B):
        same_bits(evaluation[i], ops.dropout_add_norm(x[i], r[i], w, b, 0.0)[0])


# --- randomness="different" ---------------------------------------------------------------


@pytest.mark.parametrize("batched_parameters", [False, True], ids=["shared_parameters", "per_sample_parameters"])
@pytest.mark.parametrize("name", MASKED)
def test_different_mode_is_one_call_over_the_stacked_batch(name, batched_parameters):
    """"different" draws, from the generator's state, what ONE call over the
    stacked batch draws: each sample's mask is its row of that call's mask
    (its units following the previous sample's), the generator ends where
    that call leaves it, and with shared parameters the outputs are that
    call's, bit for bit. With per-sample parameters (which run per sample)
    sample b is the op on it alone drawing that stream's units b*U ..
    (b+1)*U - 1 (shard=(b*U, U, U)). Each sample is the reference under its
    row, and the rows differ (p = 0.3: two rows agree on a unit with
    probability 0.58, on all of >= 64 units with probability < 1e-15)."""
    case = CASES[name]
    x, r, w, b, ib = operands(batched_parameters=batched_parameters)
    units = case.units(x[0].shape)
    torch.manual_seed(5)
    out = vmap(lambda *t: case.call(*t), in_dims=in_dims(batched_parameters), randomness="different")(x, r, w, b, ib)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    stacked = case.call(x.flatten(0, 1) if case.drop_path else x, r.flatten(0, 1) if case.drop_path else r,
                        w[0] if batched_parameters else w, b[0] if batched_parameters else b,
                        ib[0] if batched_parameters else ib)
    assert torch.equal(torch.get_rng_state(), after)
    bits = unpack_bits(stacked[2], B * units).view(B, units)
    assert out[2].shape == (B, (units + 7) // 8)
    for i in range(B):
        assert torch.equal(unpack_bits(out[2][i], units), bits[i])
    if not batched_parameters:
        for k in (0, 1, 3, 4):
            same_bits(out[k], stacked[k].view(out[k].shape), f"output {k}")
    torch.manual_seed(5)
    seed, offset = stream()
    for i in range(B):
        params = parameters_of((w, b, ib), i, batched_parameters)
        alone = case.call(x[i], r[i], *params, seed=seed, offset=offset, shard=(i * units, units, units))
        same_results([o[i] for o in out], alone, f"sample {i}")
        check_against_the_reference(case, out[2][i], x[i], r[i], *params, [o[i] for o in out])
    if not case.drop_path:
        for i in range(B):
            for j in range(i):
                assert not torch.equal(bits[i], bits[j]), f"samples {j} and {i} drew the same mask"


def test_low_memory_refuses_different():
    x, r, w, b, ib = operands()
    state = torch.get_rng_state()
    for f in (lambda t, s: CASES["low_memory"].call(t, s, w, b, ib)[0],
              lambda t, s: regdrop_ext.dropout_add_rms_norm(t, s, w, P, low_memory=True)):
        with pytest.raises(RuntimeError, match="low-memory"):
            vmap(f, randomness="different")(x, r)
    assert torch.equal(torch.get_rng_state(), state)


# --- randomness="same" and explicit seeds -----------------------------------------------------


@pytest.mark.parametrize("batched_parameters", [False, True], ids=["shared_parameters", "per_sample_parameters"])
@pytest.mark.parametrize("name", CASES)
def test_same_mode_is_each_sample_alone_from_one_draw(name, batched_parameters):
    """"same": every sample is the op on that sample alone called from the
    generator state of the vmapped call, bit for bit (one draw for all: the
    mask, or rng_state, comes back unbatched, and the generator moves as one
    call moves it); each sample is the reference under that mask."""
    case = CASES[name]
    x, r, w, b, ib = operands(batched_parameters=batched_parameters)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = vmap(lambda *t: case.call(*t, generator=g), in_dims=in_dims(batched_parameters), randomness="same",
               out_dims=(0, 0, None, 0, 0))(x, r, w, b, ib)
    after = g.get_state()
    for i in range(B):
        params = parameters_of((w, b, ib), i, batched_parameters)
        g.set_state(state)
        alone = case.call(x[i], r[i], *params, generator=g)
        assert torch.equal(g.get_state(), after)
        same_results([out[0][i], out[1][i], out[2], out[3][i], out[4][i]], alone, f"sample {i}")
        mask = alone[2]
        if case.low_memory:
            mask = ops.dropout_add_norm(x[i], None, None, None, P, seed=mask[0].item(), offset=mask[1].item())[2]
        check_against_the_reference(case, mask, x[i], r[i], *params, [o[i] for o in (out[0], out[1])])


@pytest.mark.parametrize("mode", ["error", "same", "different"])
@pytest.mark.parametrize("name", CASES)
def test_explicit_seed_is_the_per_sample_call_in_every_mode(name, mode):
    """seed= makes a call deterministic: in every mode, every sample's
    results are the op's on that sample alone, bit for bit, and the default
    generator is not drawn from."""
    case = CASES[name]
    x, r, w, b, ib = operands(dtype=torch.bfloat16)
    state = torch.get_rng_state()
    out = vmap(lambda t, s: case.call(t, s, w, b, ib, **SEED), randomness=mode, out_dims=(0, 0, None, 0, 0))(x, r)
    assert torch.equal(torch.get_rng_state(), state)
    for i in range(B):
        same_results([out[0][i], out[1][i], out[2], out[3][i], out[4][i]], case.call(x[i], r[i], w, b, ib, **SEED))


def test_a_draw_on_unbatched_tensors_follows_the_mode():
    """The op on tensors vmap does not batch (a weight's dropout, say):
    "same" draws once for every sample, "different" once per sample."""
    x, r, w, b, _ = operands()
    u, v = x[0], r[0]

    def f(t):
        return ops.dropout_add_norm(u, v, w, b, 0.5)[1] + 0 * t

    same = vmap(f, randomness="same")(torch.ones(B, 1, 1, 1))
    assert all(torch.equal(same[0], same[i]) for i in range(B))
    different = vmap(f, randomness="different")(torch.ones(B, 1, 1, 1))
    assert not any(torch.equal(different[0], different[i]) for i in range(1, B))  # 156 units each, p = 0.5


# --- backward ops ------------------------------------------------------------------------------


def forward_state(case, x, r, w, b, ib):
    """(residual_out, mask or rng_state, mean, rstd) of a seeded forward per sample, stacked."""
    per_sample = [case.call(x[i], r[i], w, b, ib, seed=30 + i) for i in range(B)]
    return [torch.stack([s[k] for s in per_sample]) for k in (1, 2, 3, 4)]


@pytest.mark.parametrize("gradients", ["inputs", "parameters"])
@pytest.mark.parametrize("states", ["shared", "rows", "batch_last"])
@pytest.mark.parametrize("name", ["layer", "drop_path", "low_memory"])
def test_backward_ops_are_each_samples_own(name, states, gradients):
    """The backward op over a batch of gradients, with one unbatched saved
    mask (or rng_state: "same"), a batched one (a row per sample, as
    "different" returns them), or the batch last: each sample's gradients
    (input, residual, and weight, bias and input bias where asked) are the
    backward op's on that sample alone with its own saved state, bit for bit."""
    case = CASES[name]
    x, r, w, b, ib = operands()
    residual_out, saved, mean, rstd = forward_state(case, x, r, w, b, ib)
    grads, grads_out = (nonzero_input((B, *SAMPLE), torch.float32, "cpu") for _ in range(2))
    if states == "shared":
        saved = saved[1]
    f32 = torch.float32
    wanted = {"weight_grad": f32, "bias_grad": f32, "input_bias_grad": f32} if gradients == "parameters" else {}
    def backward(g, go, s, state, m, rs):  # the gradients computed (vmap returns no None)
        if case.low_memory:
            result = ops.dropout_add_norm_low_memory_backward(g, go, s, state, m, rs, w, P, **wanted)
        else:
            result = ops.dropout_add_norm_backward(g, go, s, state, m, rs, w, P, False, case.drop_path, **wanted)
        return tuple(t for t in result if t is not None)

    batched = (grads, grads_out, residual_out, saved, mean, rstd)
    dims = (0, 0, 0, None if states == "shared" else 0, 0, 0)
    if states == "batch_last":
        batched = tuple(t.movedim(0, -1).contiguous() for t in batched)
        dims = (-1,) * 6
    result = vmap(backward, in_dims=dims)(*batched)
    for i in range(B):
        state = saved if states == "shared" else saved[i]
        alone = backward(grads[i], grads_out[i], residual_out[i], state, mean[i], rstd[i])
        same_results([o[i] for o in result], alone, f"sample {i}")
    assert len(result) == (5 if gradients == "parameters" else 2)


# --- per-sample gradients and tangents ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, mode",
    [(n, m) for n in CASES for m in ("seed", "same", "different") if (n, m) != ("low_memory", "different")],
)
def test_per_sample_gradients_are_each_samples_own(name, mode):
    """vmap(grad(loss)) with the parameters shared (Opacus's per-sample
    gradients): each sample's gradients of input, residual, weight, bias and
    input bias are those of the loss on that sample alone, bit for bit,
    under the units it draws: (seed, offset) alone ("seed"; "same" from the
    generator state of the call), or its units of one call over the batch
    ("different": shard=(b*U, U, U) of the stream the call draws)."""
    case = CASES[name]
    x, r, w, b, ib = operands()
    target = nonzero_input(SAMPLE, torch.float32, "cpu")

    def loss(t, s, w_, b_, ib_, **rng):
        output, residual_out = case.call(t, s, w_, b_, ib_, **rng)[:2]
        return ((output - target) ** 2).sum() + (residual_out * target).sum()

    rng = SEED if mode == "seed" else {}
    everything = grad(loss, argnums=(0, 1, 2, 3, 4))
    torch.manual_seed(9)
    grads = vmap(lambda *t: everything(*t, **rng), in_dims=(0, 0, None, None, None),
                 randomness="error" if mode == "seed" else mode)(x, r, w, b, ib)
    torch.manual_seed(9)
    seed, offset = (SEED["seed"], SEED["offset"]) if mode == "seed" else stream()
    units = case.units(x[0].shape)
    for i in range(B):
        shard = {"shard": (i * units, units, units)} if mode == "different" else {}
        alone = everything(x[i], r[i], w, b, ib, seed=seed, offset=offset, **shard)
        for k, (got, want) in enumerate(zip(grads, alone)):
            same_bits(got[i], want, f"sample {i}, gradient {k}")


@pytest.mark.parametrize("mode", ["seed", "same"])
def test_per_sample_gradients_of_a_one_byte_mask(mode):
    """Samples of exactly 8 units share one mask byte: vmap(grad) joins the
    expanded byte into one call's mask, which must be a real copy, not a
    stride-0 view the backward op refuses."""
    rng = {"seed": 17} if mode == "seed" else {}

    def loss(a, c):
        return torch.ops.regdrop.dropout_add_norm(a, c, None, None, 0.5, **rng)[0].sum()

    x, r = torch.randn(2, 8), torch.randn(2, 8)
    got = vmap(grad(loss), randomness="error" if mode == "seed" else mode)(x, r)
    if mode == "seed":
        for i in range(2):
            same_bits(got[i], grad(loss)(x[i], r[i]), f"sample {i}")


def test_per_sample_tangents_are_each_samples_own():
    """vmap(jvp): forward-mode tangents of output and residual stream, per
    sample, those of jvp on that sample alone (seeded)."""
    x, r, w, b, ib = operands(dtype=torch.float64)
    dx, dr = (torch.randn_like(x) for _ in range(2))
    dw = torch.randn_like(w)

    def f(t, s, w_):
        return ops.dropout_add_norm(t, s, w_, b, P, 1e-5, False, ib, **SEED)[:2]

    primals, tangents = vmap(lambda *a: jvp(f, a[:3], a[3:]), in_dims=(0, 0, None, 0, 0, None))(x, r, w, dx, dr, dw)
    for i in range(B):
        p_alone, t_alone = jvp(f, (x[i], r[i], w), (dx[i], dr[i], dw))
        for got, want in zip(primals + tangents, p_alone + t_alone):
            same_bits(got[i], want)
