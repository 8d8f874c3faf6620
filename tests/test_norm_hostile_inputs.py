"""Hostile inputs through the norm ops (dropout + residual + LayerNorm /
RMSNorm), their functions and modules: property-based shapes, dtypes,
layouts, probabilities, non-finite values, and flawed operands, masks,
rng_states and row statistics.

Every call either matches the reference or raises ValueError, TypeError or
RuntimeError with a message whose subject is the bad argument; the same
call on meta tensors (the op bodies themselves, as fake tensors run them)
refuses it alike or gives the same shapes and dtypes. No call touches its
inputs. The reference: the residual stream bit for bit (the kernels'
epilogue in pure torch, NaN as NaN), the mask in the documented order
(element units row-major over the input whatever its strides, samples along
dim 0), the output close to F.layer_norm / F.rms_norm of that stream.
"""

import math
import re

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regdrop_ext
from reference import compute_dtype, element_keep, keep_scale, masked_reference, sample_keep

ops = torch.ops.regdrop

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REJECTED_DTYPES = [torch.int32, torch.bool, torch.complex64]
PROBABILITIES = [0.0, 0.3, 1.0, 1 - 1e-9, -1e-9, math.nan, 1.5]
ARGUMENTS = ("input|residual|weight|bias|input_bias|p|mask|rng_state|mean|rstd|grad_output|grad_residual_out|"
             "residual_out|weight_grad|bias_grad|input_bias_grad")
# An error names the argument it is about, as the subject of its message.
NAMES_AN_ARGUMENT = re.compile(rf"^({ARGUMENTS})('s [a-z ()]+)? (must|has)\b")
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 3e-2}

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def tensors(draw, dtypes=FLOAT_DTYPES + REJECTED_DTYPES, max_dims=4):
    """A tensor of any dtype and layout (contiguous, permuted, sliced,
    expanded), with NaN, Inf and signed zeros among its values sometimes."""
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=max_dims))
    dtype = draw(st.sampled_from(dtypes))
    base = torch.randn(shape, dtype=torch.float64) * 3
    if base.numel() and draw(st.booleans()):
        specials = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e30], dtype=torch.float64)
        where = torch.rand(base.shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < 0.2
        base = torch.where(where, specials[torch.arange(base.numel()).view(base.shape) % 5], base)
    x = base > 0 if dtype == torch.bool else base.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "permuted", "sliced", "expanded"]))
    if layout == "permuted" and x.dim() > 1:
        x = x.permute(draw(st.permutations(range(x.dim()))))
    elif layout == "sliced" and x.dim() > 0 and x.shape[0] > 1:
        x = x[::2]
    elif layout == "expanded" and x.dim() > 0 and x.shape[0] > 0:
        x = x[:1].expand((draw(st.integers(1, 3)),) + tuple(x.shape[1:]))
    return x


def call_and_classify(fn):
    try:
        return fn(), None
    except (ValueError, TypeError, RuntimeError) as error:
        message = str(error).split("\n")[0]
        assert NAMES_AN_ARGUMENT.search(message), f"unclear error: {message}"
        return None, error


def check_outcome(error, expected):
    if expected is None:
        assert error is None, f"unexpected {type(error).__name__}: {error}"
    else:
        assert isinstance(error, expected), f"expected {expected.__name__}, got {error!r}"


def bits(t):
    # A copy: contiguous() of one element keeps its stride, which view(uint8) refuses.
    return t if t.dtype == torch.bool else t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def on_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    return value


def same_on_meta(call, args, kwargs, result, error):
    """The call on meta operands: the same refusal, or outputs of the same shapes and dtypes."""
    meta_result, meta_error = call_and_classify(lambda: call(*map(on_meta, args), **kwargs))
    assert type(meta_error) is type(error), f"meta: {meta_error!r}, real: {error!r}"
    if error is not None:
        assert str(meta_error).split("\n")[0] == str(error).split("\n")[0]
        return
    for m, r in zip(meta_result, result):
        assert (m is None) == (r is None) and (r is None or (m.shape, m.dtype) == (r.shape, r.dtype))


def companion_ok(t, x):
    """A residual or parameter dtype the ops take beside input x."""
    return t.dtype == x.dtype or (t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))


OPERAND_FLAWS = ["none", "residual_shape", "residual_dtype", "weight_length", "weight_dtype", "bias_int",
                 "input_bias_length"]


def operands_for(x, flaw, with_residual, with_affine):
    """residual, weight, bias and input bias for x (plain, or with one flaw)."""
    h = x.shape[-1] if x.dim() else 1
    dtype = x.dtype if x.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(h)
    r = (torch.randn(x.shape, generator=g, dtype=torch.float64) * 3).to(dtype) if with_residual else None
    w = (torch.rand(h, generator=g, dtype=torch.float64) + 0.5).to(dtype) if with_affine else None
    b = torch.randn(h, generator=g, dtype=torch.float64).to(dtype) if with_affine else None
    ib = torch.randn(h, generator=g, dtype=torch.float64).to(dtype)
    if flaw == "residual_shape" and r is not None:
        r = torch.zeros((2,) + tuple(x.shape), dtype=dtype)
    elif flaw == "residual_dtype" and r is not None:
        r = r.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif flaw == "weight_length" and w is not None:
        w = torch.ones(h + 1, dtype=dtype)
    elif flaw == "weight_dtype" and w is not None:
        w = w.to(torch.float64 if dtype != torch.float64 else torch.float16)
    elif flaw == "bias_int" and b is not None:
        b = b.to(torch.int32)
    elif flaw == "input_bias_length":
        ib = torch.ones(max(h - 1, 0) if h > 1 else 2, dtype=dtype)
    return r, w, b, ib


def expected_forward_error(x, p, drop_path, r, w, b, ib):
    """The first check the op makes that fails, in the order it makes them."""
    if not 0.0 <= p <= 1.0:
        return ValueError
    if not x.is_floating_point():
        return TypeError
    if x.dim() == 0 or x.shape[-1] == 0 or (drop_path and x.dim() < 2):
        return RuntimeError
    if r is not None:
        if r.shape != x.shape:
            return RuntimeError
        if not companion_ok(r, x):
            return TypeError
    for t in (w, b, ib):
        if t is None:
            continue
        if not t.is_floating_point():
            return TypeError
        if t.shape != x.shape[-1:]:
            return RuntimeError
        if not companion_ok(t, x):
            return TypeError
    return None


def check_forward_values(x, r, w, b, ib, p, rms, drop_path, result):
    output, residual_out, mask, mean, rstd = result
    stream = r.dtype if r is not None else x.dtype
    assert output.dtype == x.dtype and residual_out.dtype == stream and output.shape == x.shape
    assert mean.shape == rstd.shape == x.shape[:-1] and mean.dtype == compute_dtype(x.dtype)
    if p == 0:
        assert mask.numel() == 0
        keep = torch.ones(x.shape, dtype=torch.bool)
    else:
        keep = sample_keep(mask, x) if drop_path else element_keep(mask, torch.empty(x.shape))  # row-major units
    expected = masked_reference(x, keep, keep_scale(p), residual=r, bias=ib).to(stream)
    torch.testing.assert_close(residual_out, expected, rtol=0, atol=0, equal_nan=True)
    c = compute_dtype(x.dtype)
    s, h = residual_out.to(c), x.shape[-1:]
    weight = None if w is None else w.to(c)
    norm = F.rms_norm(s, h, weight, 1e-5) if rms else F.layer_norm(s, h, weight, None if b is None else b.to(c), 1e-5)
    finite = torch.isfinite(s).all(-1, keepdim=True).expand(s.shape)
    # Finite rows against float64 (torch's float32 layer_norm gives NaN for a row [1e30]). A row
    # whose sum of squares (about the mean for LayerNorm) overflows the compute dtype gives NaN
    # for LayerNorm, as torch's layer_norm does, and zeros for RMSNorm (rstd 0), as torch's rms_norm.
    s64 = s.double()
    centred = s64 if rms else s64 - s64.mean(-1, keepdim=True)
    overflows = (centred.square().sum(-1, keepdim=True) > torch.finfo(c).max).expand(s.shape) & finite
    exact = F.rms_norm(s64, h, None, 1e-5) if rms else F.layer_norm(s64, h, None, None, 1e-5)
    exact = torch.where(overflows, math.nan if not rms else 0.0, exact)
    if weight is not None:
        exact = exact * weight.double() + (0 if rms or b is None else b.double())
    tolerance = TOLERANCE[x.dtype]
    scale = 1 + exact[finite].nan_to_num(0).abs().max().item() if finite.any() else 1
    torch.testing.assert_close(output.double()[finite], exact[finite], rtol=tolerance, atol=tolerance * scale,
                               equal_nan=True)
    # A row with NaN or Inf in its stream follows IEEE arithmetic as torch's norms do: a
    # LayerNorm row is all NaN; an RMSNorm row with an Inf has rstd 0, so its finite
    # elements give zeros and the Inf a NaN.
    torch.testing.assert_close(output.to(c)[~finite], norm[~finite], rtol=0, atol=0, equal_nan=True)


@SETTINGS
@given(data=st.data())
def test_forward(data):
    """The forward op over hostile inputs: refused (naming the argument, alike
    on meta tensors), or the reference; its inputs untouched."""
    x = data.draw(tensors())
    p = data.draw(st.sampled_from(PROBABILITIES))
    rms, drop_path, with_residual, with_affine = (data.draw(st.booleans()) for _ in range(4))
    flaw = data.draw(st.sampled_from(OPERAND_FLAWS))
    r, w, b, ib = operands_for(x, flaw, with_residual, with_affine)
    b = None if rms else b
    before = [None if t is None else bits(t).clone() for t in (x, r, w, b, ib)]
    args = (x, r, w, b, p, 1e-5, rms, ib, drop_path)
    kwargs = {"seed": 3, "offset": 4}
    result, error = call_and_classify(lambda: ops.dropout_add_norm(*args, **kwargs))
    check_outcome(error, expected_forward_error(x, p, drop_path, r, w, b, ib))
    for t, saved in zip((x, r, w, b, ib), before):
        assert t is None or torch.equal(bits(t), saved)
    same_on_meta(ops.dropout_add_norm, args, kwargs, result, error)
    if result is not None:
        check_forward_values(x, r, w, b, ib, p, rms, drop_path, result)


STATE_FLAWS = ["none", "short", "long", "dtype", "strided", "2-d", "mean_dtype", "mean_count", "rstd_count",
               "residual_out_dtype", "grad_residual_out_shape", "weight_length", "weight_grad_dtype"]


def flawed(t, flaw):
    """A mask or rng_state with a flaw of its own."""
    return {
        "short": lambda m: m[:-1],
        "long": lambda m: torch.cat([m, m[:1]]) if m.numel() else torch.zeros(1, dtype=m.dtype),
        "dtype": lambda m: m.to(torch.int32),
        "strided": lambda m: torch.stack([m, m], 1).view(-1)[::2] if m.numel() > 1 else m.view(1, -1),
        "2-d": lambda m: m.view(1, -1),
    }.get(flaw, lambda m: m)(t)


@SETTINGS
@given(data=st.data())
def test_backward_checks_masks_rng_states_and_statistics(data):
    """The backward ops with one flawed argument each (its mask or
    rng_state, the row statistics, residual_out, grad_residual_out, the
    weight, or a gradient dtype asked for): refused, naming the argument,
    or, where nothing is wrong (a mask p == 0 does not read), the gradients
    of the sound call, bit for bit; the inputs untouched."""
    x = data.draw(tensors(dtypes=FLOAT_DTYPES, max_dims=3).filter(lambda t: t.dim() >= 2 and t.shape[-1] > 0))
    p = data.draw(st.sampled_from([0.0, 0.4]))
    low_memory = data.draw(st.booleans())
    flaw = data.draw(st.sampled_from(STATE_FLAWS))
    r, w, _, _ = operands_for(x, "none", True, True)
    if low_memory:
        out, res, saved, mean, rstd = ops.dropout_add_norm_low_memory(x, r, w, None, p, seed=2)
    else:
        out, res, saved, mean, rstd = ops.dropout_add_norm(x, r, w, None, p, seed=2)
    grad, grad_res = torch.randn(x.shape, dtype=torch.float64).to(x.dtype), torch.randn(res.shape).to(res.dtype)
    bad = {"saved": flawed(saved, flaw), "mean": mean, "rstd": rstd, "res": res, "grad_res": grad_res, "w": w}
    wanted = {"weight_grad": w.dtype}
    if flaw == "mean_dtype":
        bad["mean"] = mean.to(torch.float16)
    elif flaw == "mean_count":
        bad["mean"] = torch.cat([mean.reshape(-1), mean.reshape(-1)[:1]]) if mean.numel() else torch.zeros(1)
    elif flaw == "rstd_count":
        bad["rstd"] = torch.cat([rstd.reshape(-1), rstd.new_ones(1)])
    elif flaw == "residual_out_dtype":
        bad["res"] = res.to(torch.float64 if res.dtype != torch.float64 else torch.float32)
    elif flaw == "grad_residual_out_shape":
        bad["grad_res"] = grad_res[..., :-1]
    elif flaw == "weight_length":
        bad["w"] = torch.cat([w, w[:1]])
    elif flaw == "weight_grad_dtype":
        wanted["weight_grad"] = torch.float64 if x.dtype != torch.float64 else torch.float16

    def backward(saved_, mean_, rstd_, res_, grad_res_, w_):
        if low_memory:
            return ops.dropout_add_norm_low_memory_backward(grad, grad_res_, res_, saved_, mean_, rstd_, w_, p,
                                                            **wanted)
        return ops.dropout_add_norm_backward(grad, grad_res_, res_, saved_, mean_, rstd_, w_, p, **wanted)

    before = [bits(t).clone() for t in bad.values()]
    result, error = call_and_classify(lambda: backward(*bad.values()))
    for t, saved_bits in zip(bad.values(), before):
        assert torch.equal(bits(t), saved_bits)
    state = bad["saved"]
    state_intact = (state.dtype == saved.dtype and state.dim() == 1 and state.is_contiguous()
                    and state.numel() == saved.numel())
    reads_state = low_memory or p > 0  # a mask of p == 0 is not read
    sound = flaw == "none" or (flaw in {"short", "long", "dtype", "strided", "2-d"} and (state_intact or not reads_state))
    if sound:
        assert error is None, f"unexpected {error!r}"
        for got, want in zip(result, backward(saved, mean, rstd, res, grad_res, w)):
            assert (got is None and want is None) or torch.equal(bits(got), bits(want))
    else:
        assert error is not None, f"flaw {flaw} not refused"
        flawed_argument = {"mean_dtype": "mean", "mean_count": "mean", "rstd_count": "rstd",
                           "residual_out_dtype": "residual_out", "grad_residual_out_shape": "grad_residual_out",
                           "weight_length": "weight", "weight_grad_dtype": "weight_grad"}
        name = flawed_argument.get(flaw, "rng_state" if low_memory else "mask")
        assert str(error).startswith(name), f"flaw {flaw}: {error}"


FUNCTIONS = {
    "dropout_add_layer_norm": lambda x, r, w, b, p, **k: regdrop_ext.dropout_add_layer_norm(x, r, w, b, p, **k),
    "dropout_add_rms_norm": lambda x, r, w, b, p, **k: regdrop_ext.dropout_add_rms_norm(x, r, w, p, 1e-5, **k),
    "drop_path_add_layer_norm": lambda x, r, w, b, p, **k: regdrop_ext.drop_path_add_layer_norm(x, r, w, b, p, **k),
}


@SETTINGS
@given(data=st.data())
def test_functions_equal_the_op_from_the_same_generator_state(data):
    """The functions over hostile probabilities, training flags and modes:
    a bad p is refused (ValueError naming p) even when not training; else
    the result is the op's from the same generator state, bit for bit (p
    == 0 when not training), the residual stream too with prenorm."""
    name = data.draw(st.sampled_from(list(FUNCTIONS)))
    x = data.draw(tensors(dtypes=FLOAT_DTYPES, max_dims=3).filter(lambda t: t.dim() >= 2 and t.shape[-1] > 0))
    p = data.draw(st.sampled_from(PROBABILITIES))
    training, prenorm = data.draw(st.booleans()), data.draw(st.booleans())
    low_memory = data.draw(st.booleans()) and name != "drop_path_add_layer_norm"
    r, w, b, _ = operands_for(x, "none", True, True)
    kwargs = {"training": training, "prenorm": prenorm, **({"low_memory": low_memory} if low_memory else {})}
    torch.manual_seed(5)
    result, error = call_and_classify(lambda: FUNCTIONS[name](x, r, w, b, p, **kwargs))
    if not 0.0 <= p <= 1.0:
        assert isinstance(error, ValueError) and str(error).startswith("p must")
        return
    assert error is None, f"unexpected {error!r}"
    rms, drop_path = "rms" in name, "drop_path" in name
    torch.manual_seed(5)
    q = p if training else 0.0
    if low_memory and q > 0:
        expected = ops.dropout_add_norm_low_memory(x, r, w, None if rms else b, q, 1e-5, rms)
    else:
        expected = ops.dropout_add_norm(x, r, w, None if rms else b, q, 1e-5, rms, None, drop_path)
    for got, want in zip(result if prenorm else (result,), expected[:2]):
        assert torch.equal(bits(got), bits(want))
