"""Hostile inputs through every public entry: the raw ops, the functions and
the modules, with property-based shapes, strides, dtypes and probabilities.

Every call either matches the pure-torch reference or raises ValueError,
TypeError or RuntimeError with a message naming the bad argument. It never
crashes, never touches an input it does not own, and never returns a wrong
result silently.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regdrop_ext
from reference import channel_keep, element_keep, keep_scale, masked_reference, sample_keep

ops = torch.ops.regdrop

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REJECTED_DTYPES = [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64]
PROBABILITIES = [-1.0, math.nan, math.inf, -math.inf, 0.0, 1.0, 1 - 1e-9, 1e-9, 0.5, 1.5, -1e-9]
ARGUMENT_NAMES = ("input", "p", "mask", "grad", "residual", "bias", "rng_state", "probability", "dropout")

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def valid_p(p: float) -> bool:
    return 0.0 <= p <= 1.0


@st.composite
def tensors(draw, device, dtypes=FLOAT_DTYPES + REJECTED_DTYPES, min_dims=0, max_dims=6):
    """A tensor of any dtype in any layout: contiguous, permuted, sliced,
    expanded (overlapping) or channels_last."""
    shape = draw(st.lists(st.integers(0, 6), min_size=min_dims, max_size=max_dims))
    dtype = draw(st.sampled_from(dtypes))
    base = (torch.randn(shape, dtype=torch.float64) * 3).to(device)
    x = base.to(dtype) if dtype != torch.bool else base > 0
    layout = draw(st.sampled_from(["contiguous", "permuted", "sliced", "expanded", "channels_last"]))
    if layout == "permuted" and x.dim() > 1:
        x = x.permute(draw(st.permutations(range(x.dim()))))
    elif layout == "sliced" and x.dim() > 0 and x.shape[0] > 1:
        x = x[::2]
    elif layout == "expanded" and x.dim() > 0 and x.shape[0] > 0:
        x = x[:1].expand((draw(st.integers(1, 4)),) + tuple(x.shape[1:]))
    elif layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def call_and_classify(fn):
    try:
        return fn(), None
    except (ValueError, TypeError, RuntimeError) as error:
        message = str(error)
        assert any(name in message for name in ARGUMENT_NAMES), f"unclear error: {message}"
        return None, error


def expected_error(x, p, needs_dims=0):
    if not valid_p(p):
        return ValueError
    if x.dtype not in FLOAT_DTYPES:
        return TypeError
    if x.dim() < needs_dims:
        return RuntimeError
    return None


def check_outcome(result, error, expected):
    if expected is None:
        assert error is None, f"unexpected {type(error).__name__}: {error}"
    else:
        assert isinstance(error, expected), f"expected {expected.__name__}, got {error!r} / {result!r}"


def scale(p):
    return keep_scale(p)


def unchanged(before, after):
    assert torch.equal(before, after) or (before.is_floating_point() and torch.allclose(before, after, equal_nan=True))


# --- raw forward ops ---------------------------------------------------------------


@pytest.mark.parametrize(
    "op, needs_dims, keep",
    [
        ("dropout", 0, element_keep),
        ("drop_path", 1, sample_keep),
        ("channel_dropout", 2, channel_keep),
    ],
)
@SETTINGS
@given(data=st.data())
def test_forward_ops(device, op, needs_dims, keep, data):
    x = data.draw(tensors(device))
    p = data.draw(st.sampled_from(PROBABILITIES))
    before = x.clone()
    result, error = call_and_classify(lambda: getattr(ops, op)(x, p, seed=3, offset=4))
    check_outcome(result, error, expected_error(x, p, needs_dims))
    unchanged(before, x)
    if result is not None:
        out, mask = result
        flags = keep(mask, out) if op == "dropout" else keep(mask, x)
        torch.testing.assert_close(out, masked_reference(x, flags, scale(p)), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", ["dropout_add", "drop_path_add", "bias_dropout_add"])
@SETTINGS
@given(data=st.data())
def test_residual_ops(device, op, data):
    x = data.draw(tensors(device, dtypes=FLOAT_DTYPES, min_dims=1))
    p = data.draw(st.sampled_from([0.0, 0.3, 1.0, math.nan]))
    mismatch = data.draw(st.sampled_from(["none", "shape", "dtype", "layout", "bias_len"]))
    residual = torch.randn(x.shape, dtype=torch.float64, device=device).to(x.dtype)
    bias = torch.randn(x.shape[-1], dtype=torch.float64, device=device).to(x.dtype)
    expected = None if valid_p(p) else ValueError
    if mismatch == "shape" and expected is None:
        residual = torch.randn((x.shape[0] + 1,) + tuple(x.shape[1:]), device=device).to(x.dtype)
        expected = RuntimeError
    elif mismatch == "dtype" and expected is None:
        residual = residual.double() if x.dtype != torch.float64 else residual.float()
        expected = TypeError
    elif mismatch == "layout":
        residual = residual.t() .contiguous().t() if residual.dim() == 2 else residual[:1].expand(residual.shape)
    elif mismatch == "bias_len" and op == "bias_dropout_add" and expected is None:
        bias = torch.randn(x.shape[-1] + 1, device=device).to(x.dtype)
        expected = RuntimeError
    if op == "bias_dropout_add":
        call = lambda: ops.bias_dropout_add(x, bias, residual, p, seed=1)  # noqa: E731
    else:
        call = lambda: getattr(ops, op)(x, residual, p, seed=1)  # noqa: E731
    result, error = call_and_classify(call)
    check_outcome(result, error, expected)
    if result is not None:
        out, mask = result
        flags = sample_keep(mask, x) if op == "drop_path_add" else element_keep(mask, out)
        reference = masked_reference(x, flags, scale(p), residual=residual, bias=bias if op == "bias_dropout_add" else None)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)


# --- raw backward ops ------------------------------------------------------------------


MASK_FLAWS = ["none", "short", "long", "dtype", "strided", "2-d"]


def flawed_mask(mask, flaw):
    return {
        "none": lambda m: m,
        "short": lambda m: m[:-1],
        "long": lambda m: torch.cat([m, m[:1]]) if m.numel() else torch.zeros(1, dtype=m.dtype, device=m.device),
        "dtype": lambda m: m.to(torch.int32),
        "strided": lambda m: torch.stack([m, m], 1).view(-1)[::2] if m.numel() > 1 else m.view(1, -1),
        "2-d": lambda m: m.view(1, -1),
    }[flaw](mask)


@pytest.mark.parametrize(
    "forward, backward, needs_dims",
    [
        (lambda x: ops.dropout(x, 0.5, seed=1), lambda g, m: ops.dropout_backward(g, m, 0.5), 0),
        (lambda x: ops.drop_path(x, 0.5, seed=1), lambda g, m: ops.drop_path_backward(g, m, 0.5), 1),
        (lambda x: ops.channel_dropout(x, 0.5, seed=1), lambda g, m: ops.channel_dropout_backward(g, m, 0.5), 2),
        (lambda x: ops.dropout(x, 0.5, seed=1), lambda g, m: ops.bias_dropout_add_backward(g, m, 0.5)[0], 1),
    ],
    ids=["dropout", "drop_path", "channel_dropout", "bias_dropout_add"],
)
@SETTINGS
@given(data=st.data())
def test_backward_ops_check_their_masks(device, forward, backward, needs_dims, data):
    x = data.draw(tensors(device, dtypes=FLOAT_DTYPES, min_dims=needs_dims))
    out, mask = forward(x)
    flaw = data.draw(st.sampled_from(MASK_FLAWS))
    bad = flawed_mask(mask, flaw)
    grad = torch.randn_like(out)
    before = (grad.clone(), bad.clone())
    result, error = call_and_classify(lambda: backward(grad, bad))
    still_valid = bad.dtype == torch.uint8 and bad.dim() == 1 and bad.is_contiguous() and bad.numel() == mask.numel()
    check_outcome(result, error, None if still_valid else (TypeError if bad.dtype != torch.uint8 else RuntimeError))
    unchanged(before[0], grad)
    unchanged(before[1], bad)
    if result is not None:
        assert result.shape == grad.shape


def test_low_memory_backward_checks_rng_state(device):
    grad = torch.randn(5, device=device)
    for bad, error in [
        (torch.zeros(2, device=device), TypeError),
        (torch.zeros(3, dtype=torch.int64, device=device), RuntimeError),
        (torch.zeros(4, dtype=torch.int64, device=device)[::2], RuntimeError),
        (torch.zeros(1, 2, dtype=torch.int64, device=device), RuntimeError),
    ]:
        with pytest.raises(error, match="rng_state"):
            ops.dropout_low_memory_backward(grad, bad, 0.5)


# --- functions and modules -----------------------------------------------------------


PUBLIC_CALLS = {
    "dropout": lambda x, p: regdrop_ext.dropout(x, p),
    "dropout_low_memory": lambda x, p: regdrop_ext.dropout(x, p, low_memory=True),
    "Dropout": lambda x, p: regdrop_ext.Dropout(p)(x),
    "drop_path": lambda x, p: regdrop_ext.drop_path(x, p, training=True),
    "DropPath": lambda x, p: regdrop_ext.DropPath(p)(x),
    "dropout_add": lambda x, p: regdrop_ext.dropout_add(x, x.detach().clone(), p),
    "drop_path_add": lambda x, p: regdrop_ext.drop_path_add(x, x.detach().clone(), p),
}


@pytest.mark.parametrize("entry", PUBLIC_CALLS)
@SETTINGS
@given(data=st.data())
def test_public_functions_and_modules(device, entry, data):
    x = data.draw(tensors(device, min_dims=1))
    p = data.draw(st.sampled_from(PROBABILITIES))
    if entry == "Dropout" and not 0 <= p <= 1 and not math.isnan(p):
        # torch.nn.Dropout refuses such p at construction (NaN slips through
        # its check; our forward refuses it).
        with pytest.raises(ValueError, match="dropout probability"):
            regdrop_ext.Dropout(p)
        return
    before = x.clone()
    result, error = call_and_classify(lambda: PUBLIC_CALLS[entry](x, p))
    if not valid_p(p):
        expected = ValueError
    elif p == 0.0 or x.dtype in FLOAT_DTYPES:
        expected = None
    else:
        expected = TypeError
    check_outcome(result, error, expected)
    unchanged(before, x)
    if result is not None:
        assert result.shape == x.shape and result.dtype == x.dtype


@SETTINGS
@given(data=st.data())
def test_inplace_entries(device, data):
    x = data.draw(tensors(device, dtypes=FLOAT_DTYPES, min_dims=2, max_dims=5))
    entry = data.draw(st.sampled_from(["dropout_", "channel_dropout_"]))
    overlapping = x.numel() > 0 and any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape))
    before = x.clone()
    result, error = call_and_classify(lambda: getattr(ops, entry)(x, 0.5, seed=2))
    check_outcome(result, error, RuntimeError if overlapping else None)
    if error is not None:
        unchanged(before, x)  # a refused in-place op leaves its input as it was
    else:
        reference = getattr(ops, entry.rstrip("_"))(before, 0.5, seed=2)[0]
        torch.testing.assert_close(x, reference, rtol=0, atol=0)
