"""The norm family: dropout + residual + LayerNorm / RMSNorm in one pass
(torch.ops.regdrop.dropout_add_norm and its functional forms).

Checked against pure-torch references given the returned mask; the mask
against dropout_add's and drop_path_add's; statistics, outputs and gradients
bit for bit against a NumPy implementation of the documented summation order
(tests/reference.py), whatever the CPU instruction set or thread count;
gradients by gradcheck (float64, forward and reverse mode) and against
autograd of the reference; every feature flag and odd hidden sizes.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import regdrop_ext.norm as N
from reference import (
    compute_dtype,
    element_keep,
    keep_scale,
    norm_backward_in_order,
    norm_forward_in_order,
    sample_keep,
)

ops = torch.ops.regdrop
HIDDEN = [1, 7, 8, 33, 4097]
INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def same_bits(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
    view = INT_VIEW[a.element_size()]
    assert torch.equal(a.contiguous().view(view), b.contiguous().view(view)), what


def operands(rows, hidden, dtype, device="cpu", seed=0, stream=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(device, dtype)
    r = torch.randn(rows, hidden, generator=g).to(device, stream or dtype)
    pdtype = stream or dtype
    w = (torch.rand(hidden, generator=g) + 0.5).to(device, pdtype)
    b = torch.randn(hidden, generator=g).to(device, pdtype)
    ib = torch.randn(hidden, generator=g).to(device, pdtype)
    return x, r, w, b, ib


def reference(x, residual, weight, bias, keep, scale, eps, rms, input_bias=None, stream=None):
    """(output, residual_out) in pure torch: the residual stream rounded to
    its dtype, then F.layer_norm / F.rms_norm of it in the compute dtype."""
    c = compute_dtype(x.dtype)
    v = x.to(c) if input_bias is None else x.to(c) + input_bias.to(c)
    kept = v * torch.tensor(scale, dtype=c)
    if residual is None:
        s = torch.where(keep, kept, torch.zeros((), dtype=c))
    else:
        r = residual.to(c)
        s = torch.where(keep, r + kept, r)
    stream = stream or (residual.dtype if residual is not None else x.dtype)
    s = s.to(stream)
    w = None if weight is None else weight.to(c)
    b = None if bias is None else bias.to(c)
    h = (x.shape[-1],)
    y = F.rms_norm(s.to(c), h, w, eps) if rms else F.layer_norm(s.to(c), h, w, b, eps)
    return y.to(x.dtype), s


TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype],
                               msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_forward_against_the_reference(device, dtype, hidden, rms):
    x, r, w, b, ib = operands(5, hidden, dtype, device)
    for p in (0.0, 0.3):
        out, res, mask, mean, rstd = ops.dropout_add_norm(x, r, w, None if rms else b, p, 1e-5, rms, ib, seed=7)
        keep = element_keep(mask, x).to(device) if p > 0 else torch.ones_like(x, dtype=torch.bool)
        assert mask.numel() == (0 if p == 0 else (x.numel() + 7) // 8)
        y, s = reference(x, r, w, None if rms else b, keep, keep_scale(p), 1e-5, rms, ib)
        same_bits(res, s, "residual_out")
        close(out, y, dtype, "output")
        c = s.to(compute_dtype(dtype))
        assert mean.dtype == rstd.dtype == compute_dtype(dtype) and mean.shape == (5,)
        close(mean, torch.zeros(5) if rms else c.mean(-1), dtype, "mean")
        var = (c * c).mean(-1) if rms else c.var(-1, unbiased=False)
        close(rstd, (var + 1e-5).rsqrt(), dtype, "rstd")


@pytest.mark.parametrize("hidden", [7, 33, 4097])
def test_mask_is_dropout_adds_and_samples_are_drop_path_adds(device, hidden):
    """Element units: the bits dropout_add draws for the same seed and
    offset, groups of 8 straddling rows included; drop-path: drop_path_add's."""
    x, r, w, b, _ = operands(9, hidden, torch.float32, device)
    _, res, mask, _, _ = ops.dropout_add_norm(x, r, w, b, 0.4, seed=11, offset=8)
    expected, expected_mask = ops.dropout_add(x, r, 0.4, seed=11, offset=8)
    same_bits(mask, expected_mask, "mask")
    same_bits(res, expected, "residual_out")
    x3, r3 = x.view(3, 3, hidden), r.view(3, 3, hidden)
    _, res, mask, _, _ = ops.dropout_add_norm(x3, r3, w, b, 0.4, drop_path=True, seed=11, offset=8)
    expected, expected_mask = ops.drop_path_add(x3, r3, 0.4, seed=11, offset=8)
    same_bits(mask, expected_mask, "sample mask")
    same_bits(res, expected, "drop-path residual_out")


@pytest.mark.parametrize("hidden", [1, 7, 8, 33, 100, 4097])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_statistics_and_outputs_follow_the_documented_order(hidden, rms):
    """float32: mean, rstd, output and every gradient equal, bit for bit, a
    NumPy implementation of row_order.h's order (reference.py)."""
    rows = 70  # several chunks and lanes of the column plan for the small widths
    x, r, w, b, _ = operands(rows, hidden, torch.float32, seed=hidden)
    bias = None if rms else b
    out, res, mask, mean, rstd = ops.dropout_add_norm(x, r, w, bias, 0.25, 1e-3, rms, seed=5)
    s = res.numpy()
    wn, bn = w.numpy(), (np.zeros(hidden, np.float32) if rms else b.numpy())
    y, m, rs = norm_forward_in_order(s, wn, bn if not rms else np.float32(-0.0), 1e-3, rms)
    same_bits(mean, torch.from_numpy(m), "mean")
    same_bits(rstd, torch.from_numpy(rs), "rstd")
    same_bits(out, torch.from_numpy(y.astype(np.float32)), "output")

    dy = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1))
    grads = ops.dropout_add_norm_backward(dy, None, res, mask, mean, rstd, w, 0.25, rms, weight_grad=torch.float32,
                                          bias_grad=torch.float32, input_bias_grad=torch.float32)
    keep = element_keep(mask, x).numpy()
    expected = norm_backward_in_order(dy.numpy(), s, m, rs, wn, keep, keep_scale(0.25), rms)
    for name, got, want in zip(["grad_residual", "grad_input", "grad_weight", "grad_bias", "grad_input_bias"],
                               [grads[1], grads[0], grads[2], grads[3], grads[4]], expected):
        same_bits(got, torch.from_numpy(np.asarray(want, dtype=np.float32)), name)


def test_the_widest_rows():
    """65536 elements a row, against the reference."""
    x, r, w, b, _ = operands(2, 65536, torch.float32)
    out, res, mask, _, _ = ops.dropout_add_norm(x, r, w, b, 0.1, seed=1)
    y, s = reference(x, r, w, b, element_keep(mask, x), keep_scale(0.1), 1e-5, False)
    same_bits(res, s)
    close(out, y, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_fp32_residual_stream(device, dtype):
    """A 16-bit input with a float32 residual (or residual_in_fp32 without
    one): the stream, residual_out and the parameters in float32, the
    output in the input's dtype."""
    x, r, w, b, ib = operands(6, 40, dtype, device, stream=torch.float32)
    out, res, mask, _, _ = ops.dropout_add_norm(x, r, w, b, 0.3, input_bias=ib, seed=2)
    assert out.dtype == dtype and res.dtype == torch.float32
    y, s = reference(x, r, w, b, element_keep(mask, x).to(device), keep_scale(0.3), 1e-5, False, ib)
    same_bits(res, s)
    close(out, y, dtype)
    out, res, mask, _, _ = ops.dropout_add_norm(x, None, w, b, 0.3, residual_in_fp32=True, seed=2)
    assert res.dtype == torch.float32
    y, s = reference(x, None, w, b, element_keep(mask, x).to(device), keep_scale(0.3), 1e-5, False,
                     stream=torch.float32)
    same_bits(res, s)
    close(out, y, dtype)


def test_no_residual_no_affine_and_no_bias(device):
    x, _, w, b, _ = operands(4, 19, torch.float32, device)
    for weight, bias in [(None, None), (w, None), (None, b)]:
        out, res, mask, _, _ = ops.dropout_add_norm(x, None, weight, bias, 0.5, seed=3)
        y, s = reference(x, None, weight, bias, element_keep(mask, x).to(device), keep_scale(0.5), 1e-5, False)
        same_bits(res, s)
        close(out, y, torch.float32)


def test_dropped_elements_are_selected_never_multiplied(device):
    """A dropped NaN or Inf leaves exactly the residual in the stream; p == 1
    keeps nothing."""
    x, r, w, b, _ = operands(3, 16, torch.float32, device)
    x[0, :8] = float("nan")
    x[1, :8] = float("inf")
    _, res, mask, _, _ = ops.dropout_add_norm(x, r, w, b, 1.0, seed=1)
    same_bits(res, r)
    assert not mask.any()


def test_a_row_whose_variance_overflows_is_nan_for_layer_norm_and_zeros_for_rms_norm(device):
    """Finite rows whose variance (mean square) overflows float32, as torch's
    norms treat them: LayerNorm NaN, rather than rstd 0 quietly giving the
    bias; RMSNorm zeros (rstd 0). The row beside them is unaffected."""
    x = torch.tensor([[1.0, 1e30, 2.0], [1.0, 2.0, 4.0]], device=device)
    b = torch.full((3,), 0.5, device=device)
    layer = ops.dropout_add_norm(x, None, None, b, 0.0)
    assert torch.isnan(layer[0][0]).all() and torch.isnan(F.layer_norm(x[:1], (3,), None, b)).all()
    torch.testing.assert_close(layer[0][1], F.layer_norm(x[1], (3,), None, b))
    rms = ops.dropout_add_norm(x, None, None, None, 0.0, 1e-5, True)[0]
    same_bits(rms[0], torch.zeros(3, device=device))
    same_bits(F.rms_norm(x[0], (3,)), torch.zeros(3, device=device))
    torch.testing.assert_close(rms[1], F.rms_norm(x[1], (3,), None, 1e-5))


def test_p_zero_and_eval_draw_nothing(device):
    x, r, w, b, _ = operands(4, 24, torch.float32, device)
    g = torch.Generator(device=device).manual_seed(3)
    state = g.get_state()
    out, res, mask, _, _ = ops.dropout_add_norm(x, r, w, b, 0.0, generator=g)
    assert mask.numel() == 0 and torch.equal(g.get_state(), state)
    same_bits(res, x + r)
    out_eval = N.dropout_add_layer_norm(x, r, w, b, 0.5, training=False)
    same_bits(out_eval, out)


def test_generator_streams(device):
    """A generator's successive calls draw new masks; its seed reproduces them."""
    x, r, w, b, _ = operands(8, 64, torch.float32, device)
    torch.manual_seed(4)
    first = ops.dropout_add_norm(x, r, w, b, 0.5)[2]
    second = ops.dropout_add_norm(x, r, w, b, 0.5)[2]
    torch.manual_seed(4)
    assert torch.equal(first, ops.dropout_add_norm(x, r, w, b, 0.5)[2])
    assert not torch.equal(first, second)


def test_shard_draws_the_larger_calls_bits():
    """shard=(first, run, stride): row blocks of a tensor, drawn apart, draw
    the whole tensor's mask (as every random op's shards do)."""
    x, r, w, b, _ = operands(6, 13, torch.float32)
    _, _, whole, _, _ = ops.dropout_add_norm(x, r, w, b, 0.5, seed=9)
    bits = element_keep(whole, x)
    for rows in [slice(0, 2), slice(2, 5), slice(5, 6)]:
        first = rows.start * 13
        n = (rows.stop - rows.start) * 13
        part = ops.dropout_add_norm(x[rows], r[rows], w, b, 0.5, seed=9, shard=(first, n, n))[2]
        assert torch.equal(element_keep(part, x[rows]), bits[rows])
    low = ops.dropout_add_norm_low_memory(x[2:5], r[2:5], w, b, 0.5, seed=9, shard=(26, 39, 39))
    same_bits(low[1], ops.dropout_add_norm(x, r, w, b, 0.5, seed=9)[1][2:5])


# ---------------------------------------------------------------- gradients


def as_float64(*tensors):
    return [None if t is None else t.double().requires_grad_() for t in tensors]


@pytest.mark.parametrize(
    "rms, residual, affine, input_bias, drop_path",
    [(False, True, True, True, False), (True, True, True, True, False), (False, False, True, False, False),
     (False, True, False, False, False), (False, True, True, False, True), (True, False, True, False, True)],
    ids=["layer", "rms", "no-residual", "no-affine", "drop-path", "rms-drop-path-no-residual"],
)
def test_gradcheck_reverse_and_forward_mode(rms, residual, affine, input_bias, drop_path):
    x, r, w, b, ib = operands(6, 11, torch.float32)
    x, r, w, b, ib = as_float64(x, r if residual else None, w if affine else None, None if rms or not affine else b,
                                ib if input_bias else None)
    x = x.view(3, 2, 11) if drop_path else x
    r = r.view(3, 2, 11) if (drop_path and r is not None) else r
    inputs = [t for t in (x, r, w, b, ib) if t is not None]

    def f(*given):
        it = iter(given)
        args = [next(it) if t is not None else None for t in (x, r, w, b, ib)]
        out, res, _, _, _ = ops.dropout_add_norm(args[0], args[1], args[2], args[3], 0.4, 1e-5, rms, args[4],
                                                 drop_path, seed=3)
        return out, res

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


def test_low_memory_gradients_equal_the_masks(device):
    """Backward draws the bits again from rng_state: the same gradients, bit for bit."""
    x, r, w, b, ib = operands(5, 37, torch.float32, device)
    grads = []
    for op in (ops.dropout_add_norm, ops.dropout_add_norm_low_memory):
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b, ib)]
        out, res, *_ = op(*leaves[:4], 0.3, 1e-5, False, leaves[4], seed=5)
        (out * torch.arange(out.numel(), device=device).view_as(out).sin() + res).sum().backward()
        grads.append([out, res] + [t.grad for t in leaves])
    for a, e in zip(*grads):
        same_bits(a, e)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["post", "pre"])
def test_gradients_against_autograd_of_the_reference(device, dtype, rms, prenorm):
    """Every gradient (input, residual, weight, bias, input bias), with the
    residual stream's own gradient (prenorm) or not."""
    x, r, w, b, ib = operands(9, 40, dtype, device)
    bias = None if rms else b
    fn = N.dropout_add_rms_norm if rms else N.dropout_add_layer_norm
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, r, w, bias, ib)]
    torch.manual_seed(2)
    kwargs = {"input_bias": leaves[4], "prenorm": prenorm}
    result = (fn(leaves[0], leaves[1], leaves[2], 0.3, 1e-5, **kwargs) if rms
              else fn(leaves[0], leaves[1], leaves[2], leaves[3], 0.3, 1e-5, **kwargs))
    torch.manual_seed(2)
    mask = ops.dropout_add_norm(x, r, w, bias, 0.3, 1e-5, rms, ib)[2]
    keep = element_keep(mask, x).to(device)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, r, w, bias, ib)]
    y, s = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3], keep, keep_scale(0.3), 1e-5, rms,
                     ref_leaves[4])
    g = torch.Generator().manual_seed(3)
    gy, gs = torch.randn(9, 40, generator=g).to(device), torch.randn(9, 40, generator=g).to(device)
    out = result[0] if prenorm else result
    loss = (out.double() * gy).sum() + ((result[1].double() * gs).sum() if prenorm else 0)
    loss.backward()
    ((y * gy).sum() + ((s * gs).sum() if prenorm else 0)).backward()
    scale = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for name, mine, ref in zip(["input", "residual", "weight", "bias", "input_bias"], leaves, ref_leaves):
        if mine is None:
            continue
        assert mine.grad.dtype == mine.dtype, name
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=scale, atol=scale * ref.grad.abs().max().item(),
                                   msg=lambda m: f"grad {name}: {m}")


def test_drop_path_gradients(device):
    x, r, w, b, _ = operands(8, 24, torch.float32, device)
    x3, r3 = x.view(4, 2, 24).requires_grad_(), r.view(4, 2, 24).clone().requires_grad_()
    out = N.drop_path_add_layer_norm(x3, r3, w, b, 0.5, generator=torch.Generator(device=device).manual_seed(1))
    out.sum().backward()
    mask = ops.dropout_add_norm(x3, r3, w, b, 0.5, drop_path=True,
                                generator=torch.Generator(device=device).manual_seed(1))[2]
    keep = sample_keep(mask, x3).to(device)
    xr, rr = x3.detach().double().requires_grad_(), r3.detach().double().requires_grad_()
    y, _ = reference(xr, rr, w, b, keep, keep_scale(0.5), 1e-5, False)
    y.sum().backward()
    close(x3.grad, xr.grad, torch.float32)
    close(r3.grad, rr.grad, torch.float32)
    dropped = ~keep[:, 0, 0]
    assert (x3.grad[dropped] == 0).all()


@pytest.mark.parametrize("drop_path, shape", [(False, (0, 16)), (True, (0, 4, 16)), (True, (3, 0, 16))],
                         ids=["elements", "drop-path-no-samples", "drop-path-no-rows-per-sample"])
def test_no_rows_give_empty_outputs_and_zero_parameter_gradients(device, drop_path, shape):
    """A tensor of no rows (an empty shard's; drop-path: no samples, or
    samples of no rows): empty outputs, and column sums over no rows, zeros
    (never the memory they were allocated in)."""
    _, _, w, b, ib = operands(1, 16, torch.float32, device)
    fused = N.drop_path_add_layer_norm if drop_path else N.dropout_add_layer_norm
    for poison in range(3):  # allocations that reuse freed memory full of ones
        torch.ones(4096, device=device).add_(poison)
        leaves = [t.clone().requires_grad_() for t in ((w, b) if drop_path else (w, b, ib))]
        x = torch.empty(shape, device=device, requires_grad=True)
        input_bias = {} if drop_path else {"input_bias": leaves[2]}  # drop-path forms take none
        out, res = fused(x, x * 1, leaves[0], leaves[1], 0.3, prenorm=True, **input_bias)
        assert out.shape == res.shape == shape
        (out.sum() + res.sum()).backward()
        for t in leaves:
            assert torch.equal(t.grad, torch.zeros_like(t))


def test_samples_without_rows_draw_drop_paths_bits(device):
    """A (B, 0, H) drop-path call has B samples and no row: its mask holds
    the B bits drop_path_add draws for the same seed, not the memory it was
    allocated in (poisoned with ones first; 20 samples, so a chance match is
    2^-20 per seed)."""
    x = torch.empty(20, 0, 16, device=device)
    for seed in range(3):
        for _ in range(8):  # freed masks of the same size, full of ones, for the allocator to hand back
            torch.full((3,), 255, dtype=torch.uint8, device=device)
        mask = ops.dropout_add_norm(x, x, None, None, 0.5, drop_path=True, seed=seed)[2]
        same_bits(mask, ops.drop_path_add(x, x, 0.5, seed=seed)[1], f"seed {seed}")


def test_an_infinite_eps_makes_each_finite_row_its_bias():
    """eps infinite in the compute type (inf, or 1e39 narrowed to float32)
    over a finite variance: rstd 0, so every row is its bias, as torch's
    layer_norm gives it (and RMSNorm signed zeros, as torch's rms_norm)."""
    x, r, w, b, _ = operands(3, 8, torch.float32)
    for eps in (float("inf"), 1e39):
        out, _, _, _, rstd = ops.dropout_add_norm(x, r, w, b, 0.0, eps)
        same_bits(rstd, torch.zeros(3), f"eps {eps}: rstd")
        same_bits(out, F.layer_norm(x + r, (8,), w, b, eps), f"eps {eps}: output")
        same_bits(out, b.expand(3, 8), f"eps {eps}: the bias")
        rms = ops.dropout_add_norm(x, r, w, None, 0.0, eps, True)[0]
        same_bits(rms, F.rms_norm(x + r, (8,), w, eps), f"eps {eps}: rms output")
        assert (rms == 0).all()


def test_double_backward_is_refused():
    x, r, w, b, _ = as_float64(*operands(3, 8, torch.float32)[:4], None)
    out = ops.dropout_add_norm(x, r, w, b, 0.3, seed=1)[0]
    (grad,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(grad.sum(), x)


# ------------------------------------------------------- CPU kernel copies

ISA_SCRIPT = """
import sys, torch, regdrop_ext
outs = []
for threads, (x, r, w, b, dy) in [(t, call) for t in (1, 3) for call in torch.load(sys.argv[1])]:
    torch.set_num_threads(threads)
    out, res, mask, mean, rstd = torch.ops.regdrop.dropout_add_norm(x, r, w, b, 0.3, 1e-5, False, b, seed=4)
    grads = torch.ops.regdrop.dropout_add_norm_backward(dy, res, res, mask, mean, rstd, w, 0.3,
        weight_grad=w.dtype, bias_grad=b.dtype, input_bias_grad=b.dtype)
    outs += [out, res, mask, mean, rstd, *grads]
torch.save(outs, sys.argv[2])
"""


@pytest.mark.slow
def test_every_kernel_copy_and_thread_count_gives_the_same_bits(tmp_path):
    """The baseline, AVX2 and AVX-512 copies at 1 and 3 threads: outputs,
    masks, statistics and gradients (the column sums' order included) alike."""
    calls = []  # made here: torch's own random kernels differ between instruction sets
    for rows, hidden, dtype, stream in [(300, 33, torch.float32, None), (100, 1000, torch.bfloat16, None),
                                        (10, 4097, torch.float16, torch.float32), (100, 64, torch.float64, None)]:
        x, r, w, b, _ = operands(rows, hidden, dtype, stream=stream, seed=hidden)
        calls.append((x, r, w, b, torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)))
    inputs = tmp_path / "inputs.pt"
    torch.save(calls, inputs)
    results = {}
    for isa in ["default", "avx2", "avx512"]:
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
        subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(inputs), str(path)], check=True, env=env)
        results[isa] = torch.load(path)
    first = results["default"][: len(results["default"]) // 2]  # one thread
    for key, tensors in results.items():
        for k, (a, e) in enumerate(zip(tensors, first + first)):
            if e.dtype == torch.uint8:
                assert torch.equal(a, e), f"{key}: mask {k}"
            else:
                same_bits(a, e, f"{key}: tensor {k}")


# ------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    x, r, w, b, _ = operands(2, 8, torch.float32)
    with pytest.raises(ValueError, match="p must be"):
        ops.dropout_add_norm(x, r, w, b, 1.5)
    with pytest.raises(TypeError, match="residual must have input's dtype"):
        ops.dropout_add_norm(x, r.double(), w, b, 0.1)
    with pytest.raises(RuntimeError, match="weight must be 1-D with the size"):
        ops.dropout_add_norm(x, r, w[:4], b, 0.1)
    with pytest.raises(RuntimeError, match="residual must have the shape of input"):
        ops.dropout_add_norm(x, r[:1], w, b, 0.1)
    with pytest.raises(RuntimeError, match="sample dimension"):
        ops.dropout_add_norm(x[0], r[0], w, b, 0.1, drop_path=True)
    out = ops.dropout_add_norm(x, r, w, b, 0.5, seed=1)
    with pytest.raises(RuntimeError, match="mask must have ceil"):
        ops.dropout_add_norm_backward(x, None, out[1], out[2][:1], out[3], out[4], w, 0.5)
    with pytest.raises(RuntimeError, match="rstd must"):
        ops.dropout_add_norm_backward(x, None, out[1], out[2], out[3], out[4][:1], w, 0.5)
    with pytest.raises(TypeError, match="residual_out must have grad_output's dtype"):
        ops.dropout_add_norm_backward(x, None, out[1].double(), out[2], out[3], out[4], w, 0.5)
    with pytest.raises(RuntimeError, match="weight must be 1-D with the size of grad_output's last dimension"):
        ops.dropout_add_norm_backward(x, None, out[1], out[2], out[3], out[4], w[:4], 0.5)


def test_compile_fullgraph_draws_eagers_masks():
    """The op bodies run on the Meta key for fake tensors: torch.compile
    traces the ops whole, and the compiled function draws eager's masks
    (the op reads the generator where eager does) and gives its gradients."""
    x, r, w, b, _ = operands(4, 24, torch.float32)

    def f(x, r, w, b):
        out, res = N.dropout_add_layer_norm(x, r, w, b, 0.3, prenorm=True)
        return (out * res).sum()

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
        torch.manual_seed(6)
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e)
