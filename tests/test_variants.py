"""Drop-path, channel dropout, the fused residual forms and low-memory mode:
the same kernel family as dropout with other mask granularities and epilogues."""

import math

import pytest
import torch

import regdrop_ext
from conftest import requires_cuda
from reference import (
    channel_keep,
    element_keep,
    keep_scale,
    masked_reference,
    sample_keep,
    unpack_bits,
)
from helpers import assert_rounded_once, binomial_bounds, in_place, nonzero_input

ops = torch.ops.regdrop
SEED = {"seed": 21, "offset": 8}


def exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": lambda t: t[:, :, 1:, :],
}


# --- drop-path -------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_drop_path_matches_timm_formula(device, dtype, layout, scale_by_keep, p):
    x = LAYOUTS[layout](nonzero_input((16, 3, 5, 7), dtype, device))
    out, mask = ops.drop_path(x, p, scale_by_keep, **SEED)
    assert mask.shape == (2,)  # 16 samples -> 2 bytes
    scale = keep_scale(p) if scale_by_keep else (1.0 if keep_scale(p) else 0.0)
    exact(out, masked_reference(x, sample_keep(mask, x), scale))
    if layout != "sliced":
        assert out.stride() == x.stride()


def test_drop_path_add_matches_composition(device, dtype):
    x, r = nonzero_input((9, 33, 8), dtype, device), nonzero_input((9, 33, 8), dtype, device)
    out, mask = ops.drop_path_add(x, r, 0.4, True, **SEED)
    exact(out, masked_reference(x, sample_keep(mask, x), keep_scale(0.4), residual=r))
    # The same stream gives drop_path's mask.
    assert torch.equal(mask, ops.drop_path(x, 0.4, True, **SEED)[1])


def test_drop_path_keep_rate_per_sample(device):
    n = 1 << 18
    _, mask = ops.drop_path(torch.ones(n, 2, device=device), 0.3, True)
    low, high = binomial_bounds(n, 1 - round(0.3 * 65536) / 65536)
    assert low <= int(unpack_bits(mask, n).sum()) <= high


def test_drop_path_module_is_a_drop_in_for_timm():
    m = regdrop_ext.DropPath(0.1234)
    assert repr(m) == "DropPath(drop_prob=0.123)"
    assert m.scale_by_keep and regdrop_ext.DropPath().drop_prob == 0.0
    x = torch.randn(4, 5)
    assert m.eval()(x) is x and regdrop_ext.drop_path(x, 0.5, training=False) is x
    assert regdrop_ext.drop_path(x, 0.0, training=True) is x
    assert m.state_dict() == {}


# --- channel dropout ---------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_channel_dropout_matches_dropout2d_semantics(device, dtype, layout, p):
    x = LAYOUTS[layout](nonzero_input((4, 10, 5, 7), dtype, device))
    out, mask = ops.channel_dropout(x, p, **SEED)
    assert mask.shape == (5,)  # 40 channels -> 5 bytes
    exact(out, masked_reference(x, channel_keep(mask, x), keep_scale(p)))
    if layout != "sliced":
        assert out.stride() == x.stride()


def test_channels_last_with_fewer_than_8_channels_walks_a_contiguous_copy(device):
    """Masks are numbered n * C + c whatever the layout: the kernels walk a
    contiguous copy, and the output keeps the input's layout."""
    x = nonzero_input((4, 6, 5, 7), torch.float32, device).contiguous(memory_format=torch.channels_last)
    out, mask = ops.channel_dropout(x, 0.5, **SEED)
    out_contiguous, mask_contiguous = ops.channel_dropout(x.contiguous(), 0.5, **SEED)
    assert torch.equal(mask, mask_contiguous) and torch.equal(out, out_contiguous)
    assert out.stride() == x.stride()


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 9), (2, 3, 2, 3, 4)], ids=str)
def test_channel_dropout_any_rank(device, shape):
    x = nonzero_input(shape, torch.float32, device)
    for t in (x, x.movedim(1, -1).contiguous().movedim(-1, 1)):  # contiguous and channels-last-like
        out, mask = ops.channel_dropout(t, 0.5, **SEED)
        exact(out, masked_reference(t, channel_keep(mask, t), 2.0))


def test_channel_keep_rate(device):
    n, c = 512, 512
    _, mask = ops.channel_dropout(torch.ones(n, c, 2, device=device), 0.7)
    low, high = binomial_bounds(n * c, 1 - round(0.7 * 65536) / 65536)
    assert low <= int(unpack_bits(mask, n * c).sum()) <= high


@pytest.mark.parametrize(
    "ours, theirs, shape, batched",
    [
        (regdrop_ext.Dropout1d, torch.nn.Dropout1d, (3, 5), False),
        (regdrop_ext.Dropout1d, torch.nn.Dropout1d, (2, 3, 5), True),
        (regdrop_ext.Dropout2d, torch.nn.Dropout2d, (2, 3, 4, 5), True),
        (regdrop_ext.Dropout3d, torch.nn.Dropout3d, (3, 2, 4, 5), False),
        (regdrop_ext.Dropout3d, torch.nn.Dropout3d, (2, 3, 2, 4, 5), True),
    ],
)
def test_channel_modules_follow_torchs_rank_rules(device, ours, theirs, shape, batched):
    assert repr(ours(0.25, inplace=True)) == repr(theirs(0.25, inplace=True))
    assert isinstance(ours(), theirs)
    x = nonzero_input(shape, torch.float32, device)
    y = ours(0.5)(x)
    assert y.shape == x.shape
    # Whole channels are zero or scaled: (C, *) unbatched, (N, C, *) batched.
    lead = 1 if batched else 0
    flat = y.flatten(lead + 1) / x.flatten(lead + 1)
    assert ((flat == 0) | (flat == 2)).all()
    assert (flat == flat[..., :1]).all()


def test_channel_rank_warnings_and_errors_match_torch():
    with pytest.raises(RuntimeError, match="dropout1d: Expected 2D or 3D input"):
        regdrop_ext.dropout1d(torch.randn(2, 3, 4, 5))
    with pytest.warns(UserWarning, match="Received a 5-D input to dropout2d"):
        regdrop_ext.dropout2d(torch.randn(2, 3, 4, 5, 6))
    with pytest.warns(UserWarning, match="assuming that channel-wise 1D dropout"):
        regdrop_ext.dropout2d(torch.randn(2, 3, 4))
    with pytest.warns(UserWarning, match="Received a 3-D input to dropout3d"):
        regdrop_ext.dropout3d(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match=r"input must have shape \(N, C, \*\) for channel dropout"):
        ops.channel_dropout(torch.randn(5), 0.5)


def test_channel_dropout_inplace(device):
    x = nonzero_input((2, 4, 3, 3), torch.float32, device)
    expected, mask = ops.channel_dropout(x, 0.5, **SEED)
    y = x.clone()
    assert torch.equal(in_place("channel_dropout_", y, 0.5, **SEED)[1], mask) and torch.equal(y, expected)
    w = torch.randn(2, 4, 3, device=device, requires_grad=True)
    h = w * 1
    out = regdrop_ext.dropout1d(h, 0.5, inplace=True)
    assert out is h
    out.sum().backward()
    torch.testing.assert_close(w.grad, (out != 0).float() * 2)


# --- fused residual forms ---------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (13,), (4, 1000), (3, 5, 17)], ids=str)
def test_dropout_add_matches_composition(device, dtype, shape):
    x, r = nonzero_input(shape, dtype, device), nonzero_input(shape, dtype, device)
    out, mask = ops.dropout_add(x, r, 0.3, **SEED)
    exact(out, masked_reference(x, element_keep(mask, out), keep_scale(0.3), residual=r))
    assert torch.equal(mask, ops.dropout(x, 0.3, **SEED)[1])  # one stream, one mapping


@pytest.mark.parametrize("hidden", [1, 7, 8, 13, 64, 100])
def test_bias_dropout_add_matches_composition_and_bias_grad(device, dtype, hidden):
    x = nonzero_input((3, 5, hidden), dtype, device).requires_grad_()
    r = nonzero_input((3, 5, hidden), dtype, device).requires_grad_()
    b = nonzero_input((hidden,), dtype, device).requires_grad_()
    out, mask = ops.bias_dropout_add(x, b, r, 0.25, **SEED)
    keep = element_keep(mask, out)
    exact(out, masked_reference(x.detach(), keep, 1 / 0.75, residual=r.detach(), bias=b.detach()))

    grad = nonzero_input(out.shape, dtype, device)
    out.backward(grad)
    grad_input = masked_reference(grad, keep, 1 / 0.75)
    exact(x.grad, grad_input)
    exact(r.grad, grad)
    # Bias gradient: row sums of grad_input before its rounding, accumulated in float (double for
    # float64), rounded once.
    assert_rounded_once(b.grad, masked_reference(grad.to(torch.float64 if dtype == torch.float64 else torch.float32),
                                                 keep, 1 / 0.75))


def test_residual_gradient_is_passed_through_without_a_copy(device):
    x = torch.randn(64, device=device, requires_grad=True)
    r = torch.randn(64, device=device, requires_grad=True)
    seen = []
    r.register_hook(seen.append)
    grad = torch.randn(64, device=device)
    for f in (
        lambda: regdrop_ext.dropout_add(x, r, 0.5),
        lambda: regdrop_ext.drop_path_add(x.view(8, 8), r.view(8, 8), 0.5).view(64),
        lambda: regdrop_ext.bias_dropout_add(x, torch.zeros(64, device=device), r, 0.5),
    ):
        f().backward(grad)
        assert seen[-1].data_ptr() == grad.data_ptr()


@pytest.mark.parametrize(
    "call",
    [
        lambda x, r: ops.dropout_add(x, r, 0.5),
        lambda x, r: ops.drop_path_add(x, r, 0.5),
        lambda x, r: ops.bias_dropout_add(x, torch.zeros(x.shape[-1], device=x.device, dtype=x.dtype), r, 0.5),
    ],
    ids=["dropout_add", "drop_path_add", "bias_dropout_add"],
)
def test_residual_mismatches_are_refused(device, call):
    x = torch.randn(4, 6, device=device)
    with pytest.raises(RuntimeError, match=r"residual must have the shape of input \[4, 6\], got \[1, 6\] \(broadcasting is not supported\)"):
        call(x, torch.randn(1, 6, device=device))
    with pytest.raises(TypeError, match="residual must be float32, float64, float16 or bfloat16"):
        call(x, torch.ones(4, 6, device=device, dtype=torch.int32))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="residual must be on the same device as input"):
            call(x, torch.randn(4, 6))


def test_bias_mismatches_are_refused(device):
    x, r = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    for bias in (torch.randn(5, device=device), torch.randn(1, 6, device=device), torch.randn(4, 6, device=device)):
        with pytest.raises(RuntimeError, match=r"bias must be 1-D with the size of input's last dimension \(6\)"):
            ops.bias_dropout_add(x, bias, r, 0.5)
    with pytest.raises(TypeError, match="bias must be float32, float64, float16 or bfloat16"):
        ops.bias_dropout_add(x, torch.ones(6, device=device, dtype=torch.int64), r, 0.5)


def test_mismatched_layouts_are_walked_contiguously(device):
    x = torch.randn(2, 3, 4, 5, device=device)
    r = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    out, mask = ops.dropout_add(x, r, 0.5, **SEED)
    assert out.is_contiguous()
    exact(out, masked_reference(x, element_keep(mask, out), 2.0, residual=r))


# --- low-memory mode ----------------------------------------------------------------


def test_low_memory_forward_equals_masked_forward(device, dtype):
    x, r = nonzero_input((5, 77), dtype, device), nonzero_input((5, 77), dtype, device)
    out, rng_state = ops.dropout_low_memory(x, 0.4, **SEED)
    assert rng_state.dtype == torch.int64 and rng_state.device == x.device
    assert rng_state.tolist() == [SEED["seed"], SEED["offset"]]
    exact(out, ops.dropout(x, 0.4, **SEED)[0])
    out_add, _ = ops.dropout_add_low_memory(x, r, 0.4, **SEED)
    exact(out_add, ops.dropout_add(x, r, 0.4, **SEED)[0])


def test_low_memory_backward_redraws_the_same_mask(device, dtype):
    x = nonzero_input((3, 4, 5), dtype, device).transpose(0, 2).requires_grad_()
    g = torch.Generator(device=device)
    g.manual_seed(77)
    out = regdrop_ext.dropout(x, 0.5, generator=g, low_memory=True)
    grad = nonzero_input(out.shape, dtype, device)
    out.backward(grad)
    keep = out != 0
    exact(x.grad, masked_reference(grad, keep, 2.0))


def test_low_memory_records_the_generator_stream(device):
    x = torch.ones(1000, device=device)
    torch.manual_seed(5)
    out, rng_state = ops.dropout_low_memory(x, 0.5)
    seed, offset = rng_state.tolist()
    exact(out, ops.dropout(x, 0.5, seed=seed, offset=offset)[0])


def test_bad_rng_state_is_refused(device):
    grad = torch.randn(10, device=device)
    with pytest.raises(TypeError, match="rng_state must be int64"):
        ops.dropout_low_memory_backward(grad, torch.zeros(2, device=device), 0.5)
    with pytest.raises(RuntimeError, match=r"rng_state must be a contiguous int64 tensor of 2 elements"):
        ops.dropout_low_memory_backward(grad, torch.zeros(3, dtype=torch.int64, device=device), 0.5)


# --- memory saved for backward -------------------------------------------------------


def _saved_bytes(f):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        f()
    return sum(t.numel() * t.element_size() for t in saved)


def test_saved_for_backward_is_bits_per_unit(device):
    x = torch.randn(10, 3, 8, 8, device=device, requires_grad=True)
    r = torch.randn(10, 3, 8, 8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    n = x.numel()
    assert _saved_bytes(lambda: regdrop_ext.drop_path(x, 0.5, True)) == math.ceil(10 / 8)
    assert _saved_bytes(lambda: regdrop_ext.drop_path_add(x, r, 0.5)) == math.ceil(10 / 8)
    assert _saved_bytes(lambda: regdrop_ext.dropout2d(x, 0.5)) == math.ceil(30 / 8)
    assert _saved_bytes(lambda: regdrop_ext.dropout_add(x, r, 0.5)) == math.ceil(n / 8)
    assert _saved_bytes(lambda: regdrop_ext.bias_dropout_add(x, b, r, 0.5)) == math.ceil(n / 8)
    assert _saved_bytes(lambda: regdrop_ext.dropout(x, 0.5, low_memory=True)) == 16
    assert _saved_bytes(lambda: regdrop_ext.dropout_add(x, r, 0.5, low_memory=True)) == 16


# --- gradients ------------------------------------------------------------------------


GRADCHECK_CASES = {
    "drop_path": lambda x, r, b: ops.drop_path(x, 0.5, True, **SEED)[0],
    "drop_path_add": lambda x, r, b: ops.drop_path_add(x, r, 0.5, False, **SEED)[0],
    "channel_dropout": lambda x, r, b: ops.channel_dropout(x, 0.3, **SEED)[0],
    "dropout_add": lambda x, r, b: ops.dropout_add(x, r, 0.3, **SEED)[0],
    "bias_dropout_add": lambda x, r, b: ops.bias_dropout_add(x, b, r, 0.3, **SEED)[0],
    "dropout_low_memory": lambda x, r, b: ops.dropout_low_memory(x, 0.3, **SEED)[0],
    "dropout_add_low_memory": lambda x, r, b: ops.dropout_add_low_memory(x, r, 0.3, **SEED)[0],
}


@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck_and_gradgradcheck(name):
    f = GRADCHECK_CASES[name]
    inputs = tuple(
        torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in [(6, 3, 5), (6, 3, 5), (5,)]
    )
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# --- devices ---------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_cpu_and_cuda_agree_for_every_op(dtype):
    x = torch.randn(6, 5, 9, 11, dtype=dtype)
    r, b = torch.randn_like(x), torch.randn(11, dtype=dtype)
    for x_in in (x, x.contiguous(memory_format=torch.channels_last)):
        calls = [
            lambda t, r, b: ops.drop_path(t, 0.3, True, **SEED),
            lambda t, r, b: ops.drop_path_add(t, r, 0.3, True, **SEED),
            lambda t, r, b: ops.channel_dropout(t, 0.3, **SEED),
            lambda t, r, b: ops.dropout_add(t, r, 0.3, **SEED),
            lambda t, r, b: ops.bias_dropout_add(t, b, r, 0.3, **SEED),
        ]
        for call in calls:
            out_cpu, mask_cpu = call(x_in, r, b)
            out_cuda, mask_cuda = call(x_in.cuda(), r.cuda(), b.cuda())
            assert torch.equal(mask_cpu, mask_cuda.cpu())
            assert torch.equal(out_cpu, out_cuda.cpu())
