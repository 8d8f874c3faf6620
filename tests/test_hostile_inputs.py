"""Hostile inputs through every public entry: the raw ops, the functions and
the modules, with property-based shapes, strides, dtypes and probabilities.

Every call either matches the pure-torch reference or raises ValueError,
TypeError or RuntimeError with a message naming the bad argument. It never
crashes, never touches an input it does not own, and never returns a wrong
result silently.
"""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regdrop_ext
from helpers import call_op, in_place
from reference import channel_keep, element_keep, keep_scale, masked_reference, sample_keep, unit_numbers, unpack_bits

ops = torch.ops.regdrop

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REJECTED_DTYPES = [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64]
PROBABILITIES = [-1.0, math.nan, math.inf, -math.inf, 0.0, 1.0, 1 - 1e-9, 1e-9, 0.5, 1.5, -1e-9]
# An error names the argument it is about, as the subject of its message.
NAMES_AN_ARGUMENT = re.compile(r"\b(input|p|mask|grad|residual|bias|rng_state|shard|offset|generator) (must|has)\b|"
                               r"(dropout|drop_path) probability has to be")

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
        assert NAMES_AN_ARGUMENT.search(message), f"unclear error: {message}"
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


def bits(t):
    """``t``'s bytes, as integers: equal bits, NaN payloads and signed zeros included."""
    if t.dtype == torch.bool:
        return t
    return torch.empty(t.numel(), dtype=t.dtype, device=t.device).copy_(t.reshape(-1)).view(torch.uint8)


def unchanged(before, after):
    assert torch.equal(bits(before), bits(after))


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
    elif mismatch == "dtype" and expected is None:  # float dtypes mix and promote, as in eager
        residual = residual.double() if x.dtype != torch.float64 else residual.float()
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
    "forward, backward, needs_dims, unit",
    [
        (lambda x: ops.dropout(x, 0.5, seed=1), lambda g, m: ops.dropout_backward(g, m, 0.5), 0, "element"),
        (lambda x: ops.drop_path(x, 0.5, seed=1), lambda g, m: ops.drop_path_backward(g, m, 0.5), 1, "sample"),
        (lambda x: ops.channel_dropout(x, 0.5, seed=1), lambda g, m: ops.channel_dropout_backward(g, m, 0.5), 2,
         "channel"),
        (lambda x: ops.dropout(x, 0.5, seed=1), lambda g, m: ops.bias_dropout_add_backward(g, m, 0.5)[0], 1, "rows"),
    ],
    ids=["dropout", "drop_path", "channel_dropout", "bias_dropout_add"],
)
@SETTINGS
@given(data=st.data())
def test_backward_ops_check_their_masks(device, forward, backward, needs_dims, unit, data):
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
    if result is not None:  # grad through the mask's bits, unit by unit as the op numbers them
        numbers = unit_numbers("element" if unit == "rows" else unit, grad, rows=unit == "rows").flatten()
        keep = unpack_bits(bad, bad.numel() * 8)[numbers].view(grad.shape).to(device)
        torch.testing.assert_close(result, masked_reference(grad, keep, scale(0.5)), rtol=0, atol=0)


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


PUBLIC_CALLS = {  # name: (the public call, the raw op it must equal from the same generator state)
    "dropout": (lambda x, p: regdrop_ext.dropout(x, p), lambda x, p: ops.dropout(x, p)[0]),
    "dropout_low_memory": (lambda x, p: regdrop_ext.dropout(x, p, low_memory=True),
                           lambda x, p: ops.dropout_low_memory(x, p)[0]),
    "Dropout": (lambda x, p: regdrop_ext.Dropout(p)(x), lambda x, p: ops.dropout(x, p)[0]),
    "drop_path": (lambda x, p: regdrop_ext.drop_path(x, p, training=True), lambda x, p: ops.drop_path(x, p)[0]),
    "DropPath": (lambda x, p: regdrop_ext.DropPath(p)(x), lambda x, p: ops.drop_path(x, p)[0]),
    "dropout_add": (lambda x, p: regdrop_ext.dropout_add(x, x.detach().clone(), p),
                    lambda x, p: ops.dropout_add(x, x.detach().clone(), p)[0]),
    "drop_path_add": (lambda x, p: regdrop_ext.drop_path_add(x, x.detach().clone(), p),
                      lambda x, p: ops.drop_path_add(x, x.detach().clone(), p)[0]),
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
    public, raw = PUBLIC_CALLS[entry]
    before = x.clone()
    torch.manual_seed(5)
    result, error = call_and_classify(lambda: public(x, p))
    if not valid_p(p):
        expected = ValueError
    elif p == 0.0 or x.dtype in FLOAT_DTYPES:
        expected = None
    else:
        expected = TypeError
    check_outcome(result, error, expected)
    unchanged(before, x)
    if result is not None:  # p == 0 returns the input itself (and adds a residual), as torch does
        torch.manual_seed(5)
        expected = (x + x if entry.endswith("_add") else x) if p == 0.0 else raw(x, p)
        assert result.dtype == expected.dtype and torch.equal(bits(result), bits(expected))


@SETTINGS
@given(data=st.data())
def test_inplace_entries(device, data):
    x = data.draw(tensors(device, dtypes=FLOAT_DTYPES, min_dims=2, max_dims=5))
    entry = data.draw(st.sampled_from(["dropout_", "channel_dropout_"]))
    overlapping = x.numel() > 0 and any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape))
    before = x.clone()
    result, error = call_and_classify(lambda: in_place(entry, x, 0.5, seed=2))
    check_outcome(result, error, RuntimeError if overlapping else None)
    if error is not None:
        unchanged(before, x)  # a refused in-place op leaves its input as it was
    else:
        reference = getattr(ops, entry.rstrip("_"))(before, 0.5, seed=2)[0]
        torch.testing.assert_close(x, reference, rtol=0, atol=0)


# --- in-place ops: autograd, version counters, refusals before writing --------------
#
# dropout_ and channel_dropout_ behave as torch's in-place ops: gradients flow
# through the overwritten tensor (views included), the version counter moves,
# and what torch refuses (a leaf that requires grad, a view of one, an
# inference tensor outside inference mode) is refused before anything is
# written or drawn.

RAW_INPLACE = {
    "dropout_": (lambda t, **kw: in_place("dropout_", t, 0.5, **kw), element_keep),
    "channel_dropout_": (lambda t, **kw: in_place("channel_dropout_", t.view(4, 6, 2), 0.5, **kw), None),
}
PUBLIC_INPLACE = {
    "dropout": lambda t: regdrop_ext.dropout(t, 0.5, inplace=True),
    "Dropout": lambda t: regdrop_ext.Dropout(0.5, inplace=True)(t),
    "dropout1d": lambda t: regdrop_ext.dropout1d(t.view(4, 6, 2), 0.5, inplace=True),
    "dropout2d": lambda t: regdrop_ext.dropout2d(t.view(4, 6, 2, 1), 0.5, inplace=True),
    "dropout3d": lambda t: regdrop_ext.dropout3d(t.view(4, 6, 2, 1, 1), 0.5, inplace=True),
    "Dropout2d": lambda t: regdrop_ext.Dropout2d(0.5, inplace=True)(t.view(4, 6, 2, 1)),
    "unbatched dropout1d": lambda t: regdrop_ext.dropout1d(t.view(24, 2), 0.5, inplace=True),
    **{f"raw {name}": call for name, (call, _) in RAW_INPLACE.items()},
}


@pytest.mark.parametrize("op", RAW_INPLACE)
@pytest.mark.parametrize("view", [False, True], ids=["tensor", "view"])
def test_raw_inplace_ops_carry_gradients_and_bump_versions(device, op, view):
    call, _ = RAW_INPLACE[op]
    a = torch.randn(48, device=device, requires_grad=True)
    x = a * 1
    target = x.view(6, 8) if view else x
    version = x._version
    call(target, seed=1)
    assert x._version > version
    x.sum().backward()
    kept = (x.detach() != 0).to(a.dtype)
    assert torch.equal(a.grad, kept * keep_scale(0.5))


@pytest.mark.parametrize("op", RAW_INPLACE)
def test_raw_inplace_ops_invalidate_tensors_saved_for_backward(device, op):
    call, _ = RAW_INPLACE[op]
    x = torch.randn(48, device=device, requires_grad=True) * 1
    y = (x * x).sum()  # saves x
    call(x, seed=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("entry", PUBLIC_INPLACE)
@pytest.mark.parametrize("what", ["leaf", "view of a leaf", "inference tensor"])
def test_inplace_refusals_leave_input_and_generator_untouched(device, entry, what):
    leaf = torch.randn(48, device=device, requires_grad=what != "inference tensor")
    if what == "inference tensor":
        with torch.inference_mode():
            target = torch.randn(48, device=device)
        expected = "inference tensor"
    elif what == "view of a leaf":
        target, expected = leaf.view(48), "view of a leaf Variable"
    else:
        target, expected = leaf, "leaf Variable that requires grad"
    before = target.detach().clone()
    state = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    with pytest.raises(RuntimeError, match=expected):
        PUBLIC_INPLACE[entry](target)
    assert torch.equal(target.detach(), before)
    assert torch.equal(state, torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state())


@pytest.mark.parametrize("entry", PUBLIC_INPLACE)
def test_inplace_entries_work_where_torch_allows_them(device, entry):
    """No grad, inference mode, and a non-leaf: each writes in place."""
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            t = torch.ones(48, device=device)
            PUBLIC_INPLACE[entry](t)
            assert set(t.unique().tolist()) <= {0.0, 2.0} and (t == 0).any()
    a = torch.ones(48, device=device, requires_grad=True)
    t = a * 1
    PUBLIC_INPLACE[entry](t)
    t.sum().backward()
    assert torch.equal(a.grad, (t.detach() != 0) * 2.0)


# --- mixed devices, and fake kernels that check as the real ones do ----------------

META_CALLS = {
    "dropout_add residual": lambda x, m: ops.dropout_add(x, m, 0.5),
    "dropout_add_low_memory residual": lambda x, m: ops.dropout_add_low_memory(x, m, 0.5),
    "drop_path_add residual": lambda x, m: ops.drop_path_add(x, m, 0.5),
    "bias_dropout_add residual": lambda x, m: ops.bias_dropout_add(x, x[0], m, 0.5),
    "bias_dropout_add bias": lambda x, m: ops.bias_dropout_add(x, m[0], x, 0.5),
    "dropout_backward mask": lambda x, m: ops.dropout_backward(x, m.flatten()[:1].to(torch.uint8), 0.5),
    "channel_dropout_backward mask": lambda x, m: ops.channel_dropout_backward(x, m[0, :1].to(torch.uint8), 0.5),
    "drop_path_backward mask": lambda x, m: ops.drop_path_backward(x, m[0, :1].to(torch.uint8), 0.5),
    "bias_dropout_add_backward mask": lambda x, m: ops.bias_dropout_add_backward(x, m.flatten()[:1].to(torch.uint8), 0.5),
    "dropout_low_memory_backward rng_state": lambda x, m: ops.dropout_low_memory_backward(x, m[0, :2].long(), 0.5),
    "public dropout_add": lambda x, m: regdrop_ext.dropout_add(x, m, 0.5),
    "public drop_path_add": lambda x, m: regdrop_ext.drop_path_add(x, m, 0.5),
    "public bias_dropout_add": lambda x, m: regdrop_ext.bias_dropout_add(x, x[0], m, 0.5),
}


@pytest.mark.parametrize("call", META_CALLS)
def test_a_meta_operand_beside_real_ones_raises(device, call):
    """Dispatch picks the meta (fake) kernel when any operand is meta; it
    must refuse the mix as the real kernels and native ops do, not return
    memory nobody wrote."""
    x = torch.ones(2, 4, device=device)
    with pytest.raises(RuntimeError, match="same device"):
        META_CALLS[call](x, torch.empty(2, 4, device="meta"))


def _real_and_fake(call, *tensors):
    """The exception type (or None) of call(*tensors) on real tensors and
    under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    outcomes = []
    for fake in (False, True):
        try:
            if fake:
                with FakeTensorMode() as mode:
                    call(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in tensors))
            else:
                call(*tensors)
            outcomes.append(None)
        except (ValueError, TypeError, RuntimeError) as error:
            outcomes.append(type(error))
    return outcomes


FAKE_CHECK_CASES = {
    "p": lambda x: (lambda t: ops.dropout(t, 1.5), x),
    "p nan, backward": lambda x: (lambda t, m: ops.dropout_backward(t, m, math.nan), x, ops.dropout(x, 0.5)[1]),
    "dtype": lambda x: (lambda t: ops.dropout(t, 0.5), x.int()),
    "offset without seed": lambda x: (lambda t: ops.dropout(t, 0.5, offset=4), x),
    "generator and seed": lambda x: (lambda t: ops.dropout(t, 0.5, torch.Generator(), seed=1), x),
    "residual dtype": lambda x: (lambda t, r: ops.dropout_add(t, r, 0.5), x, x.int()),
    "residual shape": lambda x: (lambda t, r: ops.dropout_add(t, r, 0.5), x, x[:1]),
    "bias shape": lambda x: (lambda t, b: ops.bias_dropout_add(t, b, t, 0.5), x, x[0, :1]),
    "bias dtype": lambda x: (lambda t, b: ops.bias_dropout_add(t, b, t, 0.5), x, x[0].int()),
    "channels of a 1-d input": lambda x: (lambda t: ops.channel_dropout(t, 0.5), x[0]),
    "samples of a 0-d input": lambda x: (lambda t: ops.drop_path(t, 0.5), x[0, 0]),
    "mask dtype": lambda x: (lambda t, m: ops.dropout_backward(t, m, 0.5), x, ops.dropout(x, 0.5)[1].int()),
    "mask size": lambda x: (lambda t, m: ops.dropout_backward(t, m, 0.5), x, ops.dropout(x, 0.5)[1][:-1]),
    "mask 2-d": lambda x: (lambda t, m: ops.dropout_backward(t, m, 0.5), x, ops.dropout(x, 0.5)[1].view(1, -1)),
    "rng_state dtype": lambda x: (lambda t, s: ops.dropout_low_memory_backward(t, s, 0.5), x, torch.zeros(2)),
    "rng_state size": lambda x: (lambda t, s: ops.dropout_low_memory_backward(t, s, 0.5), x,
                                 torch.zeros(3, dtype=torch.int64)),
    "overlapping in-place": lambda x: (lambda t: in_place("dropout_", t, 0.5), x[:1].expand(4, -1)),
    "valid": lambda x: (lambda t: ops.dropout(t, 0.5), x),
}


@pytest.mark.parametrize("case", FAKE_CHECK_CASES)
def test_fake_kernels_refuse_what_the_real_ones_refuse(case):
    """Under torch.compile and on meta tensors only the fake kernels run: each
    bad argument raises the same exception type there as in the real op."""
    call, *tensors = FAKE_CHECK_CASES[case](torch.randn(4, 17))
    real, fake = _real_and_fake(call, *tensors)
    assert real == fake, f"real op: {real}, fake kernel: {fake}"
    assert (real is None) == (case == "valid")


STRIDE_OPS = {
    "dropout": lambda t: ops.dropout(t, 0.5, seed=1)[0],
    "dropout_add": lambda t: ops.dropout_add(t, t, 0.5, seed=1)[0],
    "drop_path": lambda t: ops.drop_path(t, 0.5, seed=1)[0],
    "channel_dropout": lambda t: ops.channel_dropout(t, 0.5, seed=1)[0],
    "dropout_low_memory": lambda t: ops.dropout_low_memory(t, 0.5, seed=1)[0],
    "dropout_backward": lambda t: ops.dropout_backward(t, ops.dropout(t, 0.5, seed=1)[1], 0.5),
    "drop_path_backward": lambda t: ops.drop_path_backward(t, ops.drop_path(t, 0.5, seed=1)[1], 0.5),
    "channel_dropout_backward": lambda t: ops.channel_dropout_backward(t, ops.channel_dropout(t, 0.5, seed=1)[1], 0.5),
}


@pytest.mark.parametrize("op", STRIDE_OPS)
@SETTINGS
@given(data=st.data())
def test_fake_kernels_give_the_real_kernels_strides(op, data):
    """Size-1 dimensions included, whose strides empty_like copies."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = data.draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=2, max_size=4))
    order = data.draw(st.permutations(range(len(shape))))
    x = torch.randn([shape[d] for d in order]).permute([order.index(d) for d in range(len(shape))])
    strides = [data.draw(st.sampled_from([s, 0, 5, 100])) if n == 1 else s for n, s in zip(x.shape, x.stride())]
    x = torch.empty_strided(x.shape, strides).normal_()
    real = STRIDE_OPS[op](x)
    with FakeTensorMode() as mode:
        fake = STRIDE_OPS[op](mode.from_tensor(x))
    assert real.stride() == fake.stride()


# --- p: quantized to 2^-16 steps, the kept scaled by the keep probability ------------

NEAR_ONE = [0.99999, 1 - 2**-16, 1 - 1.4 * 2**-17, 0.999, 2**-17 * 0.6, 0.3]


@pytest.mark.parametrize("p", NEAR_ONE)
@pytest.mark.parametrize(
    "op",
    ["dropout", "drop_path", "channel_dropout", "dropout_low_memory"],
)
def test_the_output_is_unbiased_for_every_p(device, op, p):
    """E[y] = x for every p: kept units are scaled by 1 / q, q the keep
    probability the 16-bit threshold gives (1 - round(65536 p) / 65536),
    not by 1 / (1 - p). Mean of 2^24 outputs of ones, within 5 sigma; p
    within 2^-17 of 1 keeps nothing and gives zeros."""
    n = 1 << 24
    x = torch.ones(n, device=device)
    shaped = {"dropout": x, "drop_path": x, "channel_dropout": x.view(1, n, 1), "dropout_low_memory": x}[op]
    out = getattr(ops, op)(shaped, p)[0]
    q = 1 - round(p * 65536) / 65536
    if q == 0:
        assert not out.any()
        return
    scale = 1 / q
    sigma = math.sqrt(q * (1 - q)) * scale / math.sqrt(n)
    assert abs(float(out.double().mean()) - 1.0) <= 5 * sigma + 1e-12
    assert float(out.max()) == pytest.approx(scale, rel=1e-6)


# --- backward ops: what a mask can and cannot prove ---------------------------------

BACKWARD_OPS = {
    "dropout_backward": (lambda n: ops.dropout(torch.ones(n), 0.0, seed=1)[1], lambda g, m: ops.dropout_backward(g, m, 0.0)),
    "bias_dropout_add_backward": (lambda n: ops.dropout(torch.ones(n, 1), 0.0, seed=1)[1],
                                  lambda g, m: ops.bias_dropout_add_backward(g.view(-1, 1), m, 0.0)),
    "drop_path_backward": (lambda n: ops.drop_path(torch.ones(n, 4), 0.0, seed=1)[1],
                           lambda g, m: ops.drop_path_backward(g.view(-1, 1).expand(-1, 4).contiguous(), m, 0.0)),
    "channel_dropout_backward": (lambda n: ops.channel_dropout(torch.ones(1, n, 2), 0.0, seed=1)[1],
                                 lambda g, m: ops.channel_dropout_backward(g.view(1, -1, 1).expand(1, -1, 2).contiguous(),
                                                                           m, 0.0)),
    "dropout_low_memory_backward": None,
}


@pytest.mark.parametrize("op", [name for name, case in BACKWARD_OPS.items() if case is not None])
def test_mask_bits_past_the_units_are_ignored(op):
    """Contract, the same on every device: a backward op checks its mask's
    size, dtype, device and layout, never its values (a GPU would have to
    wait to read them): the bits past its units, 0 in every forward's mask,
    are ignored. So the mask of 5 kept units used for 3 gives what the first
    3 bits give (a mask cannot prove its unit count when ceil(units / 8)
    agrees)."""
    draw, backward = BACKWARD_OPS[op]
    five = draw(5)
    three = five & 0b111
    assert five.item() != three.item()
    results = [backward(torch.ones(3), mask) for mask in (five, three)]
    for got, expected in zip(*(r if isinstance(r, tuple) else (r,) for r in results)):
        assert torch.equal(got, expected)


RANDOM_OPS = {
    "dropout": lambda x, **kw: ops.dropout(x, 0.5, **kw),
    "dropout_": lambda x, **kw: in_place("dropout_", x.clone(), 0.5, **kw),
    "dropout_add": lambda x, **kw: ops.dropout_add(x, x, 0.5, **kw),
    "bias_dropout_add": lambda x, **kw: ops.bias_dropout_add(x, x[0], x, 0.5, **kw),
    "channel_dropout": lambda x, **kw: ops.channel_dropout(x, 0.5, **kw),
    "channel_dropout_": lambda x, **kw: in_place("channel_dropout_", x.clone(), 0.5, **kw),
    "drop_path": lambda x, **kw: ops.drop_path(x, 0.5, **kw),
    "drop_path_add": lambda x, **kw: ops.drop_path_add(x, x, 0.5, **kw),
    "dropout_low_memory": lambda x, **kw: ops.dropout_low_memory(x, 0.5, **kw),
    "dropout_add_low_memory": lambda x, **kw: ops.dropout_add_low_memory(x, x, 0.5, **kw),
}


@pytest.mark.parametrize("op", RANDOM_OPS)
def test_offset_without_seed_is_refused(device, op):
    """A generator picks its own offset: an offset= it would ignore raises,
    before the generator moves."""
    x = torch.randn(4, 8, device=device)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="needs seed"):
        RANDOM_OPS[op](x, offset=4)
    assert torch.equal(state, torch.get_rng_state())
    RANDOM_OPS[op](x, seed=1, offset=4)


def test_rng_state_offsets_are_taken_modulo_2_63():
    """Contract, the same on every device: an rng_state's values are not
    checked (a GPU would have to wait to read them); the kernels ignore the
    offset's top bit (philox.h tags it), so -1 draws what 2^63 - 1 draws."""
    grad = torch.randn(4096)
    for offset in (-1, -(2**63), -4):
        assert torch.equal(ops.dropout_low_memory_backward(grad, torch.tensor([3, offset]), 0.5),
                           ops.dropout_low_memory_backward(grad, torch.tensor([3, offset + 2**63]), 0.5))


# --- sizes past int64, and storage that does not hold a tensor's elements -----------


def test_unit_counts_past_int64_raise_instead_of_overflowing():
    """(N, C) of an empty tensor can exceed 2^63 - 1 channels: the count is a
    checked product, for the forward ops and the backward alike."""
    x = torch.empty(2**32, 2**31, 0)
    mask = torch.zeros(1, dtype=torch.uint8)
    for call in (lambda: ops.channel_dropout(x, 0.5), lambda: ops.channel_dropout_(x, torch.zeros(1, dtype=torch.uint8), 0.5),
                 lambda: ops.channel_dropout_backward(x, mask, 0.5), lambda: regdrop_ext.dropout1d(x, 0.5)):
        with pytest.raises(RuntimeError, match="2\\^63 - 1 channels"):
            call()


@pytest.mark.parametrize("what", ["mask", "rng_state"])
def test_a_storage_smaller_than_its_tensor_is_refused(what):
    grad = torch.randn(64)
    if what == "mask":
        t, call = ops.dropout(grad, 0.5, seed=1)[1], lambda m: ops.dropout_backward(grad, m, 0.5)
    else:
        t, call = ops.dropout_low_memory(grad, 0.5, seed=1)[1], lambda s: ops.dropout_low_memory_backward(grad, s, 0.5)
    call(t)
    shrunk = t.clone()
    shrunk.untyped_storage().resize_(t.element_size())  # a tensor past its storage's end
    with pytest.raises(RuntimeError, match="storage holds fewer bytes"):
        call(shrunk)


# --- the bias gradient of few, long rows ---------------------------------------------


BIAS_GRADIENT_SHAPES = [(1, 1 << 24), (2, 1 << 21), (1 << 22, 1)]


def test_bias_gradient_memory_stays_a_tile_whatever_the_shape():
    """bias_dropout_add_backward once took 21-27 s and 4.2 GiB more memory for
    one row of 2^24 (an accumulator row per chunk, all reduced serially).
    Its temporary memory is now bounded by the plan (tests/cpp/
    test_column_sums.cpp): measured here as the growth of the process's peak
    resident memory (VmHWM, reset before each shape through clear_refs), in a
    fresh interpreter, against what its results take: 4 bytes per element of
    the input gradient and of the bias gradient. A fixed mmap threshold makes
    glibc return every freed tensor at once, so that no shape reuses the pages
    of the one before it."""
    import os
    import subprocess
    import sys

    script = f"""
import torch, regdrop_ext

def peak_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

for shape in {BIAS_GRADIENT_SHAPES}:
    grad = torch.randn(shape)
    mask = torch.ops.regdrop.dropout(grad, 0.5, seed=1)[1]
    open("/proc/self/clear_refs", "w").write("5")  # the peak becomes the resident memory of now
    before = peak_kib()
    out = torch.ops.regdrop.bias_dropout_add_backward(grad, mask, 0.5)
    print(peak_kib() - before, flush=True)
    del grad, mask, out
"""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    for shape, grown_kib in zip(BIAS_GRADIENT_SHAPES, map(int, run.stdout.split()), strict=True):
        result_kib = (math.prod(shape) + shape[-1]) * 4 // 1024
        assert grown_kib <= result_kib + 16 * 1024, f"{shape}: peak memory grew {grown_kib} KiB for a {result_kib} KiB result"


# Shapes with units but no elements (samples or channels of size 0), or with neither.
EMPTY_SHAPES = [(20, 0, 16), (4, 5, 0), (0, 3, 8)]


def _poison_small_allocations(byte):
    """Frees blocks of the sizes an empty call's masks and states take, full of `byte`."""
    for _ in range(8):
        for size in (1, 3, 7, 16, 4096):
            torch.full((size,), byte, dtype=torch.uint8)


def _empty_calls():
    from regdrop_ext import manifest

    for op in manifest.ops("masked", "in_place", "low_memory"):
        def call(x, op=op):
            return call_op(op, x, 0.5, residual=x.clone(), bias=x.new_zeros(x.shape[-1]), seed=3)
        yield op.name, call
    for drop_path in (False, True):
        yield f"dropout_add_norm(drop_path={drop_path})", lambda x, d=drop_path: ops.dropout_add_norm(
            x, x, None, None, 0.5, drop_path=d, seed=3) if x.shape[-1] else None
    yield "dropout_add_norm_low_memory", lambda x: ops.dropout_add_norm_low_memory(
        x, x, None, None, 0.5, seed=3) if x.shape[-1] else None


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_a_call_without_elements_writes_every_output_it_returns(shape):
    """The defect class of a (B, 0, H) norm call whose sample mask went
    unwritten: every forward op, on every tensor with no elements, returns
    masks and rng states that are the same bits whatever the memory they
    were allocated in held (freed blocks of ones, then of zeros, first)."""
    x = torch.empty(shape)
    for name, call in _empty_calls():
        results = []
        for byte in (0xFF, 0x00):
            _poison_small_allocations(byte)
            results.append(call(x))
        if results[0] is None:  # the norm ops refuse an empty normalized dim, as checked elsewhere
            continue
        for k, (a, b) in enumerate(zip(*results)):
            assert a.shape == b.shape, f"{name} output {k}"
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), \
                f"{name} output {k} holds what its memory held: {a} vs {b}"
