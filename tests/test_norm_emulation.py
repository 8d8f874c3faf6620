"""The CUDA norm kernels, checked without a GPU: their block programs
(csrc/cuda/norm_bodies.h) run on the host over the real launch plan
(csrc/cuda/norm_launch.h), through tests/cuda_emulation/emulated_norm.cpp,
and every output, mask, statistic and gradient must equal the CPU kernels'
bit for bit: cached and streamed rows, drawn and read bits, element and
sample units, shards, the fp32 residual stream, vector and scalar paths.
`pytest -k emulation` selects these tests.

The extension is the one tests/test_cuda_emulation.py uses
(helpers.load_emulation).
"""

import math

import pytest
import torch

from helpers import load_emulation

INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emulation():
    return load_emulation()


def same_bits(a, b, what):
    assert (a is None) == (b is None), what
    if a is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
    view = INT_VIEW[a.element_size()]
    a_bits, b_bits = a.contiguous().view(view), b.contiguous().view(view)
    if not torch.equal(a_bits, b_bits):
        where = (a_bits != b_bits).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: bits differ at {where}")


def compare(emulation, op, *args, **kwargs):
    expected = getattr(torch.ops.regdrop, op)(*args, **kwargs)
    actual = getattr(emulation, op)(*args, **kwargs)
    for k, (e, a) in enumerate(zip(expected, actual)):
        same_bits(a, e, f"{op} output {k}")
    return expected


def make(shape, dtype, seed, aligned=True, specials=False):
    """Random values, one element into a larger storage (not 16-byte
    aligned) unless `aligned`; with `specials`, a NaN, an infinity and a
    value whose square overflows (a row whose variance does) in three rows."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    values = (torch.randn(numel + 1, generator=g, dtype=torch.float64) * 2).to(dtype)
    flat = values[:numel] if aligned else values[1:]
    if specials and numel >= 3:
        flat[numel // 4], flat[numel // 2], flat[3 * numel // 4] = math.nan, -math.inf, torch.finfo(dtype).max / 2
    return flat.view(shape)


def operands(rows, hidden, dtype, aligned=True, stream=None, seed=0):
    x = make((rows, hidden), dtype, seed, aligned, specials=True)
    r = make((rows, hidden), stream or dtype, seed + 1, aligned)
    w = make((hidden,), stream or dtype, seed + 2, aligned).abs() + 0.5
    b = make((hidden,), stream or dtype, seed + 3, aligned)
    return x, r, w, b


def forward_and_backward(emulation, x, r, w, b, p, rms=False, **kwargs):
    """The forward op and its backward op, with every gradient, both ways."""
    out, res, mask, mean, rstd = compare(emulation, "dropout_add_norm", x, r, w, None if rms else b, p, 1e-5, rms,
                                         b if r is not None else None, **kwargs)
    dy = make(tuple(x.shape), x.dtype, 99)
    drop_path = kwargs.get("drop_path", False)
    wanted = {"weight_grad": w.dtype, "bias_grad": None if rms else b.dtype, "input_bias_grad": b.dtype}
    compare(emulation, "dropout_add_norm_backward", dy, res, res, mask, mean, rstd, w, p, rms, drop_path,
            **wanted)
    compare(emulation, "dropout_add_norm_backward", dy, None, res, mask, mean, rstd, w, p, rms, drop_path,
            residual_grad=False)


HIDDEN = [1, 7, 8, 33, 96, 1000, 1024, 8192 + 8, 9001]  # T = 1 .. 256; cached and streamed rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_emulation_norm_rows(emulation, dtype, hidden):
    rows = 3 if hidden > 4096 else 37
    x, r, w, b = operands(rows, hidden, dtype, seed=hidden)
    for p in (0.0, 0.3):
        for rms in (False, True):
            forward_and_backward(emulation, x, r, w, b, p, rms, seed=5, offset=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [8, 40, 1024])
def test_emulation_norm_scalar_path(emulation, dtype, hidden):
    """Operands that are not 16-byte aligned: the scalar loads and stores."""
    x, r, w, b = operands(9, hidden, dtype, aligned=False)
    forward_and_backward(emulation, x, r, w, b, 0.3, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [33, 1024, 9000])
def test_emulation_norm_fp32_residual_stream(emulation, dtype, hidden):
    x, r, w, b = operands(5, hidden, dtype, stream=torch.float32)
    forward_and_backward(emulation, x, r, w, b, 0.3, seed=2)
    compare(emulation, "dropout_add_norm", x, None, w, b, 0.3, residual_in_fp32=True, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [7, 64, 9000])
def test_emulation_norm_drop_path_no_residual_and_low_memory(emulation, dtype, hidden):
    x, r, w, b = operands(6, hidden, dtype)
    x3, r3 = x.view(3, 2, hidden), r.view(3, 2, hidden)
    forward_and_backward(emulation, x3, r3, w, b, 0.5, drop_path=True, seed=3)
    compare(emulation, "dropout_add_norm", x, None, None, None, 0.5, seed=3)
    out, res, state, mean, rstd = compare(emulation, "dropout_add_norm_low_memory", x, r, w, b, 0.3, seed=4)
    compare(emulation, "dropout_add_norm_low_memory_backward", x, None, res, state, mean, rstd, w, 0.3,
            weight_grad=w.dtype, bias_grad=b.dtype)


def test_emulation_norm_samples_without_rows(emulation):
    """Drop-path samples of no rows launch no row kernel, yet draw their
    bits: drop_path_add's, as on the CPU (poisoned allocations first)."""
    x = torch.empty(20, 0, 16)
    for seed in range(3):
        for _ in range(8):
            torch.full((3,), 255, dtype=torch.uint8)
        mask = emulation.dropout_add_norm(x, x, None, None, 0.5, drop_path=True, seed=seed)[2]
        same_bits(mask, torch.ops.regdrop.drop_path_add(x, x, 0.5, seed=seed)[1], f"seed {seed}")


@pytest.mark.parametrize("shard", [(3, 13, 29), (8, 64, 64), (2**40 + 5, 7, 100)], ids=str)
def test_emulation_norm_shards(emulation, shard):
    """A shard draws first (draw_mask), then reads; low-memory shards draw
    again in backward."""
    x, r, w, b = operands(4, 40, torch.float32)
    forward_and_backward(emulation, x, r, w, b, 0.5, seed=6, shard=shard)
    out, res, state, mean, rstd = compare(emulation, "dropout_add_norm_low_memory", x, r, w, b, 0.5, seed=6,
                                          shard=shard)
    compare(emulation, "dropout_add_norm_low_memory_backward", x, None, res, state, mean, rstd, w, 0.5,
            weight_grad=w.dtype, shard=shard)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulation_norm_rows_of_65536(emulation, dtype):
    """The longest rows the issue asks for: streamed, 256 threads a row."""
    x, r, w, b = operands(2, 65536, dtype, seed=65536)
    forward_and_backward(emulation, x, r, w, b, 0.3, seed=3)


def test_emulation_norm_many_chunks(emulation):
    """A column plan of many chunks and lanes: 2000 rows of 40."""
    x, r, w, b = operands(2000, 40, torch.float32)
    forward_and_backward(emulation, x, r, w, b, 0.3, seed=7)


def test_emulation_reaches_every_norm_kernel_the_ops_launch(emulation):
    """Every norm kernel instantiation csrc/cuda/norm_kernels.cu builds,
    named as the machine-code gate names them, runs in one sweep."""
    names = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
    expected = {"norm_draw_mask Draw", "norm_draw_mask DrawShard"} | {f"norm_fold_chunks {n}" for n in names.values()}
    combos = [(d, None) for d in DTYPES] + [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
    for dtype, stream in combos:
        label = names[dtype] + ("" if stream is None else "/fp32")
        for kind in ("forward", "backward"):
            for source in ("Draw", "Read"):
                for rows in ("cached", "streamed"):
                    if kind == "backward" and (source == "Draw" or (rows == "cached" and dtype == torch.float64)):
                        continue  # backward reads its bits; float64 rows are streamed (cached, they would spill)
                    expected.add(f"norm_{kind} {label} {source} {rows}")
    emulation.take_norm_kernels_run()
    for dtype, stream in combos:
        wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
        for hidden in (64, 8200):
            x, r, w, b = operands(2, hidden, dtype, stream=stream)
            out, res, mask, mean, rstd = compare(emulation, "dropout_add_norm", x, r, w, b, 0.3, seed=1)
            compare(emulation, "dropout_add_norm", x, r, w, b, 0.3, drop_path=True, seed=1)
            compare(emulation, "dropout_add_norm", x, r, w, b, 0.3, seed=1, shard=(1, 3, 5))
            compare(emulation, "dropout_add_norm_backward", x, None, res, mask, mean, rstd, w, 0.3,
                    weight_grad=dtype, bias_grad=wide)
            _, res, state, mean, rstd = compare(emulation, "dropout_add_norm_low_memory", x, r, w, b, 0.3, seed=1)
            compare(emulation, "dropout_add_norm_low_memory_backward", x, None, res, state, mean, rstd, w, 0.3,
                    weight_grad=dtype)
    assert set(emulation.take_norm_kernels_run()) == expected
