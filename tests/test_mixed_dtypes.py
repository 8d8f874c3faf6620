"""Mixed float dtypes in the fused residual forms, as autocast makes them:
dropout_add, bias_dropout_add and drop_path_add accept any mix of float
dtypes, return eager's result dtype (torch.result_type of
``residual + dropout(input [+ bias])``), compute once in float32 (float64
where one operand is) and round once. The widening mix (a 16-bit input with
float32 residual and/or bias) runs in one pass, with no casting copy; the
rare mixes cast first. Gradients come back in each operand's dtype.
"""

import itertools

import pytest
import torch

import regdrop_ext
from helpers import assert_rounded_once
from reference import element_keep, keep_scale, masked_reference, result_dtype, sample_keep

ops = torch.ops.regdrop
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (input, bias, residual) dtypes that mix; an op without a bias ignores its dtype: one per (input, residual) pair.
MIXES = [m for m in itertools.product(FLOATS, FLOATS, FLOATS) if len(set(m)) > 1]
PAIRS = [(x, x, r) for x, r in itertools.product(FLOATS, FLOATS) if x != r]


def mix_id(mix):
    return "-".join(str(d).replace("torch.", "") for d in mix)


OPS = {
    # name: (call(x, b, r, p) -> (output, mask), keep flags of mask for x, uses bias)
    "dropout_add": (lambda x, b, r, p: ops.dropout_add(x, r, p, seed=3), element_keep, False),
    "dropout_add_low_memory": (lambda x, b, r, p: (ops.dropout_add_low_memory(x, r, p, seed=3)[0],
                                                   ops.dropout(x, p, seed=3)[1]), element_keep, False),
    "bias_dropout_add": (lambda x, b, r, p: ops.bias_dropout_add(x, b, r, p, seed=3), element_keep, True),
    "drop_path_add": (lambda x, b, r, p: ops.drop_path_add(x, r, p, seed=3), sample_keep, False),
}


def operands(mix, device, shape=(6, 40)):
    x_dtype, b_dtype, r_dtype = mix
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, x_dtype)
    b = torch.randn(shape[-1], generator=g).to(device, b_dtype)
    r = torch.randn(shape, generator=g).to(device, r_dtype)
    return x, b, r


def mixes(ops):
    """(op, mix) for every op and every mix it can tell apart."""
    return [pytest.param(op, mix, id=f"{op}-{mix_id(mix)}") for op in ops for mix in (MIXES if OPS[op][2] else PAIRS)]


@pytest.mark.parametrize("op, mix", mixes(OPS))
def test_every_mix_gives_eagers_dtype_and_values(device, op, mix):
    """Against the eager expression's dtype, and the reference (one rounding
    to that dtype) under the returned mask."""
    call, keep_of, uses_bias = OPS[op]
    x, b, r = operands(mix, device)
    out, mask = call(x, b, r, 0.3)
    eager = (r + torch.nn.functional.dropout(x + b if uses_bias else x, 0.3)).dtype
    assert out.dtype == eager
    keep = keep_of(mask, x if op == "drop_path_add" else out)
    expected = masked_reference(x, keep, keep_scale(0.3), residual=r, bias=b if uses_bias else None)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("op, mix", mixes(["dropout_add", "bias_dropout_add", "drop_path_add"]))
def test_gradients_come_in_each_operands_dtype(device, op, mix):
    """grad_input = keep * scale * grad (in grad's compute dtype, as the
    kernels compute it), grad_residual = grad, grad_bias = its row sums, each
    cast to its operand's dtype."""
    x, b, r = (t.requires_grad_() for t in operands(mix, device))
    function = {"dropout_add": lambda: regdrop_ext.dropout_add(x, r, 0.3),
                "bias_dropout_add": lambda: regdrop_ext.bias_dropout_add(x, b, r, 0.3),
                "drop_path_add": lambda: regdrop_ext.drop_path_add(x, r, 0.3)}[op]
    torch.manual_seed(5)
    out = function()
    grad = torch.randn(out.shape, device=device).to(out.dtype)
    out.backward(grad)
    torch.manual_seed(5)
    mask = (ops.drop_path if op == "drop_path_add" else ops.dropout)(x.detach(), 0.3)[1]
    keep = (sample_keep if op == "drop_path_add" else element_keep)(mask, x.detach())
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    through = torch.where(keep, grad.to(compute) * torch.tensor(keep_scale(0.3), dtype=compute), 0.0)
    assert x.grad.dtype == x.dtype and r.grad.dtype == r.dtype
    torch.testing.assert_close(x.grad, through.to(x.dtype), rtol=0, atol=0)
    torch.testing.assert_close(r.grad, grad.to(r.dtype), rtol=0, atol=0)
    if op == "bias_dropout_add":
        assert b.grad.dtype == b.dtype
        grad_bias = ops.bias_dropout_add_backward(grad, mask, 0.3)[1]  # in grad's dtype, rounded once
        assert_rounded_once(grad_bias, through)
        assert torch.equal(b.grad, grad_bias.to(b.dtype))


def _copies_made(call) -> int:
    """aten copies and casts that ``call`` makes, seen by the profiler (which
    sees the C++ kernels' own calls into ATen too)."""
    with torch.autograd.profiler.profile() as profile:
        call()
    return sum(event.name in ("aten::to", "aten::_to_copy", "aten::copy_") for event in profile.function_events)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_the_widening_mix_runs_in_one_pass_and_rare_mixes_cast(device, half):
    """A 16-bit input with a float32 residual and/or bias: no cast, no copy;
    the kernels read each operand in its own dtype. A mix of the two 16-bit
    types casts first (which the probe sees, so it can see them)."""
    x = torch.randn(8, 64, device=device).to(half)
    wide, wide_bias, narrow_bias = torch.randn(8, 64, device=device), torch.randn(64, device=device), \
        torch.randn(64, device=device).to(half)
    for call in (lambda: ops.dropout_add(x, wide, 0.5), lambda: ops.dropout_add_low_memory(x, wide, 0.5),
                 lambda: ops.bias_dropout_add(x, wide_bias, wide, 0.5),
                 lambda: ops.bias_dropout_add(x, narrow_bias, wide, 0.5),
                 lambda: ops.bias_dropout_add(x, wide_bias, x, 0.5),
                 lambda: ops.drop_path_add(x, wide, 0.5)):
        assert _copies_made(call) == 0
    other = torch.bfloat16 if half == torch.float16 else torch.float16
    assert _copies_made(lambda: ops.dropout_add(x, wide.to(other), 0.5)) > 0


@pytest.mark.parametrize("op", ["dropout_add", "dropout_add_low_memory", "drop_path_add", "bias_dropout_add"])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_the_widening_mixs_input_gradient_is_narrowed_in_one_pass(device, op, half):
    """The backward of the widening mix: the float32 output's gradient goes
    through the mask straight into the 16-bit input's, with no cast or copy
    (a bias gradient is summed in float32: there the input's gradient is cast
    after). Its values: float32 through the mask, rounded once; its NaNs the
    canonical one, cast or narrowed alike."""
    call, keep_of, uses_bias = OPS[op]
    x, b, r = operands((half, torch.float32, torch.float32), device)
    x.requires_grad_()
    out, mask = call(x, b, r, 0.3)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grad[0, :8] = float("nan")
    copies = _copies_made(lambda: out.backward(grad))
    assert (copies > 0) == uses_bias
    keep = keep_of(mask, x)
    expected = torch.where(keep, grad * keep_scale(0.3), 0).to(half)
    int_dtype, canonical = CANONICAL[half]
    expected.view(int_dtype)[expected.isnan()] = canonical
    assert torch.equal(x.grad.view(int_dtype), expected.view(int_dtype))


def test_a_backward_ops_dtype_is_its_input_gradients(device):
    """``dtype`` gives grad_input's dtype: a narrowing in one pass, any other
    a cast; grad_bias stays in grad's. A dtype that is not a float is refused
    by name."""
    grad = torch.randn(6, 40, device=device)
    mask = ops.dropout(grad, 0.3, seed=1)[1]
    plain = ops.dropout_backward(grad, mask, 0.3)
    for dtype in FLOATS:
        assert torch.equal(ops.dropout_backward(grad, mask, 0.3, dtype=dtype), plain.to(dtype))
    grad_input, grad_bias = ops.bias_dropout_add_backward(grad, mask, 0.3, dtype=torch.bfloat16)
    assert grad_input.dtype == torch.bfloat16 and grad_bias.dtype == torch.float32
    with pytest.raises(TypeError, match="^dtype must be"):
        ops.dropout_backward(grad, mask, 0.3, dtype=torch.int32)


def test_under_autocast_a_block_matches_its_eager_expression(device):
    """A Linear's output in bfloat16 (autocast) with a float32 residual and
    bias, as a transformer block under autocast has them: the fused forms
    take them as they are and return what eager returns, in dtype and value."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 32, bias=False).to(device)
    bias = torch.randn(32, device=device, requires_grad=True)
    h = torch.randn(4, 32, device=device, requires_grad=True)
    device_type = "cuda" if device == "cuda" else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y = linear(h)
        assert y.dtype == torch.bfloat16
        out, mask = ops.bias_dropout_add(y, bias, h, 0.2, seed=1)
        eager_dtype = (h + torch.nn.functional.dropout(y + bias, 0.2)).dtype
        fused = regdrop_ext.dropout_add(y, h, 0.2)
        drop_path = regdrop_ext.drop_path_add(y, h, 0.2)
    assert out.dtype == eager_dtype == fused.dtype == drop_path.dtype == torch.float32
    keep = element_keep(mask, out)
    torch.testing.assert_close(out, masked_reference(y, keep, keep_scale(0.2), residual=h, bias=bias), rtol=0, atol=0)
    (out.sum() + fused.sum()).backward()
    assert h.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    assert_rounded_once(bias.grad, keep * keep_scale(0.2))  # the bias gradient: column sums of the mask's scale


@pytest.mark.parametrize("mix", [(torch.bfloat16, torch.float32, torch.float32), (torch.float16, torch.float16,
                                 torch.float32), (torch.bfloat16, torch.float32, torch.bfloat16),
                                 (torch.float16, torch.bfloat16, torch.float32)], ids=mix_id)
def test_opcheck_and_compile_with_mixed_dtypes(device, mix):
    """Fake kernels give the mixed output dtype (opcheck compares them with
    the real ops), and a compiled block draws eager's masks and values."""
    x, b, r = operands(mix, device)
    seeded = {"seed": 2, "offset": 4}
    for op, args in ((ops.dropout_add, (x, r, 0.5)), (ops.bias_dropout_add, (x, b, r, 0.5)),
                     (ops.drop_path_add, (x, r, 0.5)), (ops.dropout_add_low_memory, (x, r, 0.5))):
        torch.library.opcheck(op.default, args, seeded)
    torch._dynamo.reset()

    def block(x, b, r):
        return regdrop_ext.bias_dropout_add(x, b, r, 0.3) + regdrop_ext.dropout_add(x, r, 0.3)

    compiled = torch.compile(block, fullgraph=True)
    torch.manual_seed(3)
    expected = block(x, b, r)
    torch.manual_seed(3)
    actual = compiled(x, b, r)
    assert actual.dtype == expected.dtype == result_dtype(x, b, r)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


CANONICAL = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
             torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF)}
NAN_BITS = {torch.float32: [0x7F800001, -0x400000, 0x7FC12345], torch.float64: [0x7FF0000000000001, -1],
            torch.float16: [0x7C01, -0x200, 0x7E55], torch.bfloat16: [0x7F81, -0x40, 0x7FD5]}


def nans(dtype, n):
    bits = torch.tensor(NAN_BITS[dtype] * n, dtype=torch.int64)[:n]
    return bits.to(CANONICAL[dtype][0]).view(dtype)


@pytest.mark.parametrize("op, mix", [case for case in mixes(OPS)
                                     if torch.promote_types(torch.promote_types(*case.values[1][:2]),
                                                            case.values[1][2]) != case.values[1][2]])
def test_a_residual_widened_to_the_output_writes_canonical_nans(device, op, mix):
    """A residual whose dtype is not the output's is a new value there: where
    it is kept (the dropped elements) its NaNs are the output dtype's
    canonical NaN, cast first or in the widening pass alike; a residual of
    the output's own dtype keeps its bits (test_dropout.py)."""
    call, keep_of, uses_bias = OPS[op]
    x, b, _ = operands(mix, device, shape=(4, 24))
    r = nans(mix[2], 96).view(4, 24).to(device)
    out, mask = call(x, b, r, 0.5)
    if out.dtype == r.dtype:
        pytest.skip("the residual has the output's dtype: its bits stay")
    int_dtype, canonical = CANONICAL[out.dtype]
    dropped = ~keep_of(mask, x if op == "drop_path_add" else out)
    assert dropped.any()
    assert (out.view(int_dtype)[dropped] == canonical).all()
