"""Element-wise dropout: regdrop::dropout, dropout_, dropout_backward and the
Python layers above them."""

import math

import pytest
import torch

import regdrop_ext
from helpers import binomial_bounds, in_place, nonzero_input
from reference import dropout_reference, element_keep, unpack_bits

ops = torch.ops.regdrop

SHAPES = [(0,), (1,), (7,), (8,), (9,), (1000,), (33, 65), (2, 3, 5, 7)]
P_VALUES = [0.0, 0.1, 0.5, 0.9, 1.0]


# --- forward ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", P_VALUES)
def test_output_matches_reference_given_its_mask(device, dtype, shape, p):
    x = nonzero_input(shape, dtype, device)
    out, mask = ops.dropout(x, p, seed=123, offset=4)
    assert mask.dtype == torch.uint8 and mask.shape == ((x.numel() + 7) // 8,)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    keep = element_keep(mask, out)
    torch.testing.assert_close(out, dropout_reference(x, keep, p), rtol=0, atol=0)
    # Padding bits past the last element are zero.
    bits = unpack_bits(mask, mask.numel() * 8)
    assert not bits[x.numel() :].any()


def test_mask_bits_agree_with_zeros_in_output(device, dtype):
    x = nonzero_input((4097,), dtype, device)
    out, mask = ops.dropout(x, 0.4)
    assert torch.equal(element_keep(mask, out), out != 0)


@pytest.mark.parametrize("p", [0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 0.99, 0.999])
def test_keep_rate_within_5_sigma_and_kept_units_scaled_by_its_inverse(device, p):
    """The keep rate is q = 1 - round(65536 p) / 65536 (the 16-bit threshold),
    within 5 sigma of a Binomial(n, q) count, and every kept element is 1 / q."""
    n = 1 << 22
    out, mask = ops.dropout(torch.ones(n, device=device, dtype=torch.float64), p)
    keep = unpack_bits(mask, n)
    q = 1 - round(p * 65536) / 65536
    low, high = binomial_bounds(n, q)
    assert low <= int(keep.sum()) <= high, f"kept {int(keep.sum())} of {n}, expected [{low:.0f}, {high:.0f}]"
    assert torch.equal(out.cpu()[keep], torch.full((int(keep.sum()),), 1 / q, dtype=torch.float64))


def test_p_one_gives_zeros_and_zero_gradient(device, dtype):
    x = nonzero_input((100,), dtype, device).requires_grad_()
    out = regdrop_ext.dropout(x, 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_p_zero_and_eval_return_the_input(device):
    x = torch.randn(10, device=device)
    assert regdrop_ext.dropout(x, 0.0) is x
    assert regdrop_ext.dropout(x, 0.5, training=False) is x
    m = regdrop_ext.Dropout(0.5).eval()
    assert m(x) is x


def test_dropped_nan_and_inf_become_zero_kept_ones_propagate(device, dtype):
    """Documented policy: the output is selected, never multiplied by a zero."""
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0] * 256, device=device, dtype=dtype)
    out, mask = ops.dropout(x, 0.5, seed=3, offset=0)
    keep = element_keep(mask, out)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert torch.isnan(out[keep & torch.isnan(x)]).all()
    assert torch.equal(out[keep & torch.isinf(x)], x[keep & torch.isinf(x)])


CANONICAL_NAN = {torch.float32: 0x7FFFFFFF, torch.float64: 0x7FFFFFFFFFFFFFFF, torch.float16: 0x7FFF,
                 torch.bfloat16: 0x7FFF}
INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
          torch.bfloat16: torch.int16}


def nan_payloads(dtype, n, device):
    """NaNs of both signs with assorted payloads, as `dtype`."""
    bits = {torch.float32: [0x7F800001, 0xFFC00000, 0x7FC12345, 0xFFFFFFFF],
            torch.float64: [0x7FF0000000000001, -0x8000000000000, 0x7FF8123456789ABC, -1],
            torch.float16: [0x7C01, 0xFE00, 0x7E55, 0xFFFF],
            torch.bfloat16: [0x7F81, 0xFFC0, 0x7FD5, 0xFFFF]}[dtype]
    base = torch.tensor(bits * (n // len(bits)), dtype=torch.int64)
    return base.to(INT_OF[dtype]).view(dtype).to(device)


def test_kept_nans_are_written_as_the_canonical_nan(device, dtype):
    """Contract (docs/semantics.md): a kept NaN comes out as the dtype's
    canonical NaN on both devices (0x7FFF for 16-bit types, 0x7FFFFFFF,
    0x7FFFFFFFFFFFFFFF), whatever its payload. A dropped element is 0, or the
    residual: its bits unchanged in float32 and float64, canonical in the
    16-bit types, as every NaN a 16-bit kernel writes."""
    x = nan_payloads(dtype, 1024, device)
    r = nan_payloads(dtype, 1024, device).flip(0)
    int_dtype, canonical = INT_OF[dtype], CANONICAL_NAN[dtype]
    out, mask = ops.dropout(x, 0.5, seed=3)
    keep = element_keep(mask, out)
    assert 0 < int(keep.sum()) < 1024
    assert (out.view(int_dtype)[keep] == canonical).all()
    assert (out.view(int_dtype)[~keep] == 0).all()
    out, mask = ops.dropout_add(x, r, 0.5, seed=4)
    keep = element_keep(mask, out)
    assert (out.view(int_dtype)[keep] == canonical).all()
    dropped = out.view(int_dtype)[~keep]
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(dropped, r.view(int_dtype)[~keep])
    else:
        assert (dropped == canonical).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x.transpose(1, 3),
        lambda x: x.permute(3, 1, 0, 2),
    ],
    ids=["channels_last", "transposed", "permuted"],
)
def test_dense_layouts_are_kept_and_walked_in_memory_order(device, make):
    x = make(torch.randn(2, 3, 5, 7, device=device))
    out, mask = ops.dropout(x, 0.5, seed=9, offset=0)
    assert out.stride() == x.stride()
    # Bit i belongs to the i-th element in memory: the same as a contiguous
    # tensor holding the same memory.
    flat_out, flat_mask = ops.dropout(x.as_strided((x.numel(),), (1,)), 0.5, seed=9, offset=0)
    assert torch.equal(mask, flat_mask)
    assert torch.equal(out.as_strided((out.numel(),), (1,)), flat_out)


def test_sliced_and_expanded_inputs_are_read_correctly(device):
    base = torch.randn(6, 10, device=device)
    for x in (base[:, ::3], base[1:4, 2:9], base[0].expand(4, 10)):
        out, mask = ops.dropout(x, 0.3, seed=1, offset=0)
        assert out.is_contiguous()
        expected, expected_mask = ops.dropout(x.contiguous(), 0.3, seed=1, offset=0)
        assert torch.equal(out, expected) and torch.equal(mask, expected_mask)


def test_output_never_aliases_input(device):
    x = torch.randn(64, device=device)
    out, _ = ops.dropout(x, 0.0)
    assert out.data_ptr() != x.data_ptr() and torch.equal(out, x)


# --- randomness: seeds and generators ----------------------------------------


def test_manual_seed_reproduces_and_successive_calls_differ(device):
    x = torch.ones(4096, device=device)
    torch.manual_seed(0)
    a, b = ops.dropout(x, 0.5)[1], ops.dropout(x, 0.5)[1]
    torch.manual_seed(0)
    c = ops.dropout(x, 0.5)[1]
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_generator_reproduces_and_leaves_default_generator_alone(device):
    x = torch.ones(4096, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(1234)
    a = ops.dropout(x, 0.5, g)[1]
    state = torch.random.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    g.manual_seed(1234)
    b = ops.dropout(x, 0.5, generator=g)[1]
    assert torch.equal(a, b)
    after = torch.random.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    assert torch.equal(state, after)
    assert not torch.equal(ops.dropout(x, 0.5, g)[1], ops.dropout(x, 0.5, g)[1])


def test_explicit_seed_and_offset(device):
    x = torch.ones(1000, device=device)
    same = [ops.dropout(x, 0.5, seed=42, offset=8)[1] for _ in range(2)]
    assert torch.equal(*same)
    assert not torch.equal(same[0], ops.dropout(x, 0.5, seed=42, offset=12)[1])
    assert not torch.equal(same[0], ops.dropout(x, 0.5, seed=43, offset=8)[1])


# --- autograd ----------------------------------------------------------------


def test_backward_uses_the_mask(device, dtype):
    x = nonzero_input((1001,), dtype, device).requires_grad_()
    out, mask = ops.dropout(x, 0.25)
    grad = nonzero_input((1001,), dtype, device)
    out.backward(grad)
    expected = dropout_reference(grad, element_keep(mask, out), 0.25)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_backward_accepts_grads_in_another_layout(device):
    x = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out, mask = ops.dropout(x, 0.5)
    grad = torch.randn(2, 3, 4, 5, device=device)  # contiguous, not channels_last
    out.backward(grad)
    torch.testing.assert_close(x.grad, dropout_reference(grad, element_keep(mask, out), 0.5))
    # An expanded grad, as from out.sum().backward().
    y = torch.randn(3, 4, device=device).t().requires_grad_()
    out, mask = ops.dropout(y, 0.5)
    out.sum().backward()
    torch.testing.assert_close(y.grad, dropout_reference(torch.ones_like(out), element_keep(mask, out), 0.5))


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)

    def f(t):
        return ops.dropout(t, 0.3, seed=17, offset=0)[0]

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_only_the_bit_mask_is_saved_for_backward(device, dtype):
    x = torch.randn(1001, device=device, dtype=dtype, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = regdrop_ext.dropout(x, 0.5)
    assert sum(t.numel() * t.element_size() for t in saved) == math.ceil(1001 / 8)
    out.sum().backward()


# --- in place ----------------------------------------------------------------


def test_inplace_matches_out_of_place(device, dtype):
    x = nonzero_input((3, 257), dtype, device)
    expected, mask = ops.dropout(x, 0.5, seed=5, offset=0)
    y = x.clone()
    out, inplace_mask = in_place("dropout_", y, 0.5, seed=5, offset=0)
    assert out is y
    assert torch.equal(y, expected) and torch.equal(inplace_mask, mask)


def test_inplace_on_a_sliced_view_writes_through(device):
    base = torch.randn(4, 10, device=device)
    view = base[:, 1:8]
    expected, _ = ops.dropout(view, 0.5, seed=2, offset=0)
    untouched = base[:, 8:].clone()
    in_place("dropout_", view, 0.5, seed=2, offset=0)
    assert torch.equal(base[:, 1:8], expected) and torch.equal(base[:, 8:], untouched)


def test_inplace_functional_with_autograd(device):
    w = torch.randn(300, device=device, requires_grad=True)
    h = w * 2
    g = torch.Generator(device=device)
    g.manual_seed(8)
    out = regdrop_ext.dropout(h, 0.5, inplace=True, generator=g)
    assert out is h
    out.sum().backward()
    kept = (out != 0)
    torch.testing.assert_close(w.grad, torch.where(kept, 4.0, 0.0))


def test_inplace_refuses_overlapping_memory(device):
    x = torch.randn(1, 8, device=device).expand(4, 8)
    with pytest.raises(RuntimeError, match="input has elements that share memory"):
        in_place("dropout_", x, 0.5)
    with pytest.raises(RuntimeError, match="share memory"):
        regdrop_ext.dropout(x, 0.5, inplace=True)


# --- argument checks ---------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.1, math.nan, math.inf, -math.inf])
def test_bad_probability_raises_value_error(device, p):
    x = torch.randn(8, device=device)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        regdrop_ext.dropout(x, p)
    with pytest.raises(ValueError, match="p must be a probability in"):
        ops.dropout(x, p)
    with pytest.raises(ValueError, match="p must be a probability in"):
        ops.dropout_backward(x, torch.zeros(1, dtype=torch.uint8, device=device), p)


@pytest.mark.parametrize("bad_dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_non_float_inputs_raise_type_error(device, bad_dtype):
    x = torch.zeros(8, device=device, dtype=bad_dtype)
    with pytest.raises(TypeError, match="input must be float32, float64, float16 or bfloat16"):
        ops.dropout(x, 0.5)
    with pytest.raises(TypeError, match="grad must be float32"):
        ops.dropout_backward(x, torch.zeros(1, dtype=torch.uint8, device=device), 0.5)


@pytest.mark.parametrize(
    "make_mask, error, message",
    [
        (lambda d: torch.zeros(1, dtype=torch.uint8, device=d), RuntimeError, r"mask must have ceil\(17 / 8\) = 3 bytes"),
        (lambda d: torch.zeros(4, dtype=torch.uint8, device=d), RuntimeError, r"mask must have ceil\(17 / 8\) = 3 bytes"),
        (lambda d: torch.zeros(3, dtype=torch.int32, device=d), TypeError, "mask must be uint8, got Int"),
        (lambda d: torch.zeros(3, dtype=torch.bool, device=d), TypeError, "mask must be uint8, got Bool"),
        (lambda d: torch.zeros(6, dtype=torch.uint8, device=d)[::2], RuntimeError, "mask must be a contiguous 1-D tensor"),
        (lambda d: torch.zeros(1, 3, dtype=torch.uint8, device=d), RuntimeError, "mask must be a contiguous 1-D tensor"),
    ],
)
def test_bad_masks_are_refused(device, make_mask, error, message):
    grad = torch.randn(17, device=device)
    with pytest.raises(error, match=message):
        ops.dropout_backward(grad, make_mask(device), 0.5)


def test_rng_argument_checks(device):
    x = torch.randn(8, device=device)
    with pytest.raises(RuntimeError, match="either generator or seed, not both"):
        ops.dropout(x, 0.5, torch.Generator(device=device), seed=1)
    with pytest.raises(ValueError, match="offset must be non-negative"):
        ops.dropout(x, 0.5, seed=1, offset=-4)


def test_failed_call_leaves_generator_and_input_untouched(device):
    x = torch.randn(64, device=device)
    before = x.clone()
    g = torch.Generator(device=device)
    g.manual_seed(3)
    state = g.get_state()
    with pytest.raises(ValueError):
        in_place("dropout_", x, 2.0, g)
    assert torch.equal(x, before) and torch.equal(g.get_state(), state)


# --- module ------------------------------------------------------------------


def test_module_is_a_drop_in_for_nn_dropout(device):
    ours, theirs = regdrop_ext.Dropout(0.3, inplace=True), torch.nn.Dropout(0.3, inplace=True)
    assert repr(ours) == repr(theirs) == "Dropout(p=0.3, inplace=True)"
    assert isinstance(ours, torch.nn.Dropout)
    assert ours.state_dict() == theirs.state_dict() == {}
    with pytest.raises(ValueError):
        regdrop_ext.Dropout(1.5)
    m = regdrop_ext.Dropout(0.5)
    x = torch.ones(10000, device=device)
    y = m(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    low, high = binomial_bounds(x.numel(), 0.5)
    assert low <= int((y != 0).sum()) <= high
