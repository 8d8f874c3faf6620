"""The CUDA kernels, checked without a GPU.

tests/cuda_emulation/emulated_backend.cpp registers every op a second time
(torch.ops.regdrop_cuda_emulation.*) with a backend that runs the CUDA launch
plan on the host: the kernels' thread bodies, compiled by the host compiler
from the same source nvcc compiles, for every block and thread of every
launch, block-level phases in order. Here each op is run both ways and the
outputs, masks, rng_states and bias gradients must be equal bit for bit
(NaN payloads included) to the CPU kernels'.

Covered: every op and dtype; element, sample and channel units (runs that
are whole groups, runs that are not, channels-last); tails of 1 to 7
elements; several blocks; 16-byte aligned operands (the vector path, whose
128-bit accesses the emulation performs as 16-byte copies and refuses when
misaligned) and misaligned ones (the scalar path); bias rows that are whole
groups and rows that are not; bias gradients with one chunk and with many;
special values (NaN payloads, infinities, subnormals, fp16 overflow); and,
with the launch limits lowered, calls split into many launches with
normalized divisors; shards of larger calls (shard=(first, run, stride)) of
every shape of run; subnormals under torch.set_flush_denormal(True); and the
CUDA backend's generator code with a stand-in for PyTorch's CUDA generator,
eager and under graph capture. `pytest -k emulation` selects the tests that
compare the two kernel families on many shapes.

Two tests take a `kernels` parameter: "emulated" runs here, "cuda" runs
the same body on a GPU's kernels (benchmarks/gpu_check.sh): every kernel
against the CPU, and draws captured in one CUDA graph against eager draws.
"""


import pytest
import torch

from conftest import requires_cuda
from helpers import load_emulation

from regdrop_ext.manifest import OPS

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@pytest.fixture(scope="module")
def emulation():
    return load_emulation()


@pytest.fixture
def small_launches(emulation):
    """Launches of 32 elements and divisors of 32 or more normalized: the
    paths of tensors past 2^30 elements and of dimensions past 2^31."""
    emulation.set_launch_limits(32, 32)
    yield
    emulation.set_launch_limits()


def same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.stride() == b.stride() or a.numel() <= 1, f"{what}: strides {a.stride()} != {b.stride()}"
    view = INT_VIEW[a.element_size()]
    a_bits, b_bits = a.contiguous().view(view), b.contiguous().view(view)
    if not torch.equal(a_bits, b_bits):
        where = (a_bits != b_bits).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: bits differ at {where}")


def compare(emulation, op, *args, **kwargs):
    """op on the CPU kernels and on the emulated CUDA kernels; tensors are
    cloned per side (with their strides and storage offsets), generators
    given to both in the same state."""

    def copies():
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                storage = a.untyped_storage().clone()  # a fresh allocation: offsets keep their alignment
                out.append(torch.empty(0, dtype=a.dtype).set_(storage, a.storage_offset(), a.shape, a.stride()))
            elif isinstance(a, torch.Generator):
                out.append(torch.Generator().set_state(a.get_state()))
            else:
                out.append(a)
        return out

    cpu_args, emulated_args = copies(), copies()
    expected = getattr(torch.ops.regdrop, op)(*cpu_args, **kwargs)
    actual = getattr(emulation, op)(*emulated_args, **kwargs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for k, (e, a) in enumerate(zip(expected, actual)):
        same_bits(a, e, f"{op} output {k}")
    for k, (e, a) in enumerate(zip(cpu_args, emulated_args)):  # in-place ops write their input
        if isinstance(e, torch.Tensor):
            same_bits(a, e, f"{op} argument {k}")
    return expected


def special_values(dtype):
    """Bit patterns the kernels must treat alike on both devices: NaNs with
    payloads and signs, infinities, signed zeros, subnormals, and values
    that overflow float16 when scaled."""
    if dtype == torch.float32:
        bits = [0x7F800001, 0xFFC00000, 0x7FC12345, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x807FFFFF]
        return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(dtype)
    if dtype == torch.float64:
        bits = [0x7FF0000000000001, -0x8000000000000 * 1, 0x7FF8123456789ABC, 0x7FF0000000000000, 0x1, -1]
        return torch.tensor(bits, dtype=torch.int64).view(dtype)
    if dtype == torch.float16:
        bits = [0x7C01, 0xFE00, 0x7E55, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x83FF, 0x7BFF, 0x7BFE]
    else:
        bits = [0x7F81, 0xFFC0, 0x7FD5, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F, 0x7F7F]
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(dtype)


def make(shape, dtype, seed=0, aligned=True, channels_last=False, special=True):
    """A random tensor of `shape`, with special values sprinkled in; not
    16-byte aligned unless `aligned` (one element into a larger storage)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    values = (torch.randn(numel + 1, generator=g, dtype=torch.float64) * 3).to(dtype)
    if special and numel:
        extra = special_values(dtype)
        where = torch.randint(0, numel + 1, (len(extra),), generator=g)
        values[where] = extra
    flat = values[:numel] if aligned else values[1:]
    x = flat.view(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last) if aligned else _misaligned_channels_last(x)
    return x


def _misaligned_channels_last(x):
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)
    out = storage[1:].as_strided(x.shape, x.contiguous(memory_format=torch.channels_last).stride(), 1)
    out.copy_(x)
    return out


SIZES = [1, 5, 7, 8, 13, 64, 4096 + 3, 2 * 4096 * 2 + 1]  # tails of 0-7 elements; several blocks
P = [0.0, 0.3, 1.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_emulation_element_ops(emulation, dtype, numel, aligned):
    x = make((numel,), dtype, seed=numel, aligned=aligned)
    r = make((numel,), dtype, seed=numel + 1, aligned=aligned)
    g = make((numel,), dtype, seed=numel + 2, aligned=aligned)
    for p in P:
        _, mask = compare(emulation, "dropout", x, p, seed=numel, offset=4)
        compare(emulation, "dropout_add", x, r, p, seed=numel, offset=8)
        compare(emulation, "dropout_backward", g, mask, p)
        _, rng_state = compare(emulation, "dropout_low_memory", x, p, seed=7, offset=12)
        compare(emulation, "dropout_add_low_memory", x, r, p, seed=7, offset=16)
        compare(emulation, "dropout_low_memory_backward", g, rng_state, p)
        compare(emulation, "dropout_", x, OPS["dropout_"].new_mask(x), p, seed=3)
    compare(emulation, "dropout", x, 0.5, torch.Generator().manual_seed(11))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 16), (5, 5), (3, 13), (6, 1), (3, 2, 4, 9), (17, 8 * 129 + 3)], ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_emulation_sample_units(emulation, dtype, shape, aligned):
    """drop_path: per-sample sizes that are whole groups, smaller than one,
    and neither."""
    x = make(shape, dtype, seed=1, aligned=aligned)
    r = make(shape, dtype, seed=2, aligned=aligned)
    for p in P + [0.5]:
        for scale_by_keep in (True, False):
            _, mask = compare(emulation, "drop_path", x, p, scale_by_keep, seed=5, offset=4)
            compare(emulation, "drop_path_add", x, r, p, scale_by_keep, seed=5, offset=4)
            compare(emulation, "drop_path_backward", r, mask, p, scale_by_keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, channels_last",
    [((2, 3, 4, 4), False), ((2, 5, 2, 3), False), ((3, 4, 3, 3), False), ((2, 3, 7), False), ((4, 2, 1), False),
     ((2, 8, 3, 3), True), ((2, 12, 2, 5), True), ((3, 16, 1, 3), True), ((2, 6, 3, 3), True), ((5, 9, 7, 1), True)],
    ids=str,
)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_emulation_channel_units(emulation, dtype, shape, channels_last, aligned):
    """Channel dropout: contiguous with spatial sizes that are whole groups,
    smaller than one and neither; channels-last with 8 channels or more, and
    fewer (walked through a contiguous copy)."""
    x = make(shape, dtype, seed=3, aligned=aligned, channels_last=channels_last)
    for p in P + [0.5]:
        _, mask = compare(emulation, "channel_dropout", x, p, seed=9, offset=4)
        compare(emulation, "channel_dropout_backward", x, mask, p)
        compare(emulation, "channel_dropout_", x, OPS["channel_dropout_"].new_mask(x), p, seed=9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, cols", [(1, 1), (5, 3), (4, 8), (64, 24), (3, 31), (7, 33), (300, 256), (2, 1000),
                                        (70, 1), (9, 8 * 1025 + 1)])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_emulation_bias_dropout_add_and_its_gradient(emulation, dtype, rows, cols, aligned):
    """Bias rows that are whole groups and rows that are not; the bias
    gradient's column sums with one chunk, with many, and with few rows."""
    x = make((rows, cols), dtype, seed=4, aligned=aligned)
    r = make((rows, cols), dtype, seed=5, aligned=aligned)
    b = make((cols,), dtype, seed=6, aligned=aligned)
    for p in P + [0.5]:
        _, mask = compare(emulation, "bias_dropout_add", x, b, r, p, seed=13, offset=4)
        compare(emulation, "bias_dropout_add_backward", r, mask, p)


def compare_on_gpu(op, *args, **kwargs):
    """As compare(), with the GPU's kernels in place of the emulated ones:
    tensors are copied to the GPU with their strides and storage offsets, so
    that a misaligned operand stays misaligned."""

    def copies(device):
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                storage = a.untyped_storage().clone() if device == "cpu" else a.untyped_storage().cuda()
                out.append(torch.empty(0, dtype=a.dtype, device=device).set_(storage, a.storage_offset(), a.shape,
                                                                             a.stride()))
            else:
                out.append(a)
        return out

    cpu_args, gpu_args = copies("cpu"), copies("cuda")
    expected = getattr(torch.ops.regdrop, op)(*cpu_args, **kwargs)
    actual = getattr(torch.ops.regdrop, op)(*gpu_args, **kwargs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for k, (e, a) in enumerate(zip(expected, actual)):
        same_bits(a.cpu(), e, f"{op} output {k}")
    for k, (e, a) in enumerate(zip(cpu_args, gpu_args)):
        if isinstance(e, torch.Tensor):
            same_bits(a.cpu(), e, f"{op} argument {k}")
    return expected


def every_kernel_name():
    """Every kernel instantiation csrc/cuda/kernels.cu builds, named as the
    machine-code gate names them."""
    dtypes = ["fp32", "fp64", "fp16", "bf16"]
    names = {"draw_mask Draw", "draw_mask DrawShard"}
    for name in dtypes:
        names |= {f"column_sums {name}", f"fold_chunks {name}"}
        for epilogue, source in [("Scale", "Draw"), ("AddResidual", "Draw"), ("AddBiasResidual", "Draw"),
                                 ("Scale", "DrawShard"), ("AddResidual", "DrawShard"),
                                 ("AddBiasResidual", "DrawShard"), ("Scale", "Elements"), ("Scale", "UnitPerGroup"),
                                 ("Scale", "UnitRuns"), ("Scale", "UnitChannelsLast"),
                                 ("AddResidual", "UnitPerGroup"), ("AddResidual", "UnitRuns")]:
            names.add(f"elementwise {name} {epilogue} {source}")
    for name in ("bf16", "fp16"):  # the widening mix: 16-bit input, float32 output
        for operands, epilogue, source in [
            ("fp32/{0}", "AddResidual", "Draw"), ("fp32/{0}", "AddResidual", "UnitPerGroup"),
            ("fp32/{0}", "AddResidual", "UnitRuns"), ("fp32/fp32", "AddBiasResidual", "Draw"),
            ("fp32/{0}", "AddBiasResidual", "Draw"), ("{0}/fp32", "AddBiasResidual", "Draw"),
            ("fp32/{0}", "AddResidual", "DrawShard"), ("fp32/fp32", "AddBiasResidual", "DrawShard"),
            ("fp32/{0}", "AddBiasResidual", "DrawShard"), ("{0}/fp32", "AddBiasResidual", "DrawShard"),
        ]:
            names.add(f"elementwise {name}/{operands.format(name)}->fp32 {epilogue} {source}")
        for source in ("Draw", "DrawShard", "Elements", "UnitPerGroup", "UnitRuns"):  # the narrowing mix, backward
            names.add(f"elementwise fp32/fp32/fp32->{name} Scale {source}")
    return names


def run_every_kernel(check):
    """One small sweep of the ops that launches every CUDA kernel, each on
    its vector path (16-byte aligned operands, aligned shards) and its
    general one (misaligned operands, tails, unaligned shards); check(op,
    *args, **kwargs) runs an op on the CPU kernels and on the CUDA kernels
    under test and compares them bit for bit."""
    for aligned in (True, False):
        for dtype in DTYPES:
            def t(shape, seed, dtype=dtype, **kwargs):
                return make(shape, dtype, seed=seed, aligned=aligned, **kwargs)

            x, r, b = t((64, 40), 1), t((64, 40), 2), t((40,), 3)
            mask = check("bias_dropout_add", x, b, r, 0.5, seed=1)[1]
            check("bias_dropout_add_backward", t((4096, 40), 4),
                  torch.ops.regdrop.dropout(torch.empty(4096, 40), 0.5, seed=1)[1], 0.5)  # several chunks
            check("dropout_backward", r, mask, 0.5)
            check("dropout", x, 0.5, seed=1)
            check("dropout_add", x, r, 0.5, seed=1)
            for shape in [(4, 16), (4, 5)]:  # per-sample sizes: whole groups, and not
                check("drop_path", t(shape, 5), 0.5, seed=1)
                check("drop_path_add", t(shape, 5), t(shape, 6), 0.5, seed=1)
            check("channel_dropout", t((2, 8, 3, 3), 7, channels_last=True), 0.5, seed=1)
            for shard in [(3, 13, 29), (8, 16, 40)]:  # the DrawShard kernels: an unaligned shard, an aligned one
                check("dropout", x, 0.5, seed=1, shard=shard)
                check("dropout_add", x, r, 0.5, seed=1, shard=shard)
                check("bias_dropout_add", x, b, r, 0.5, seed=1, shard=shard)
                check("drop_path", t((4, 16), 5), 0.5, seed=1, shard=shard)
            if dtype in (torch.float16, torch.bfloat16):
                wide = t((64, 40), 8, dtype=torch.float32)
                narrow_bias, wide_bias = t((40,), 9), t((40,), 9, dtype=torch.float32)
                check("dropout_add", x, wide, 0.5, seed=1)
                check("dropout_add", x, wide, 0.5, seed=1, shard=(8, 16, 40))
                for bias, residual in [(wide_bias, wide), (narrow_bias, wide), (wide_bias, r)]:
                    check("bias_dropout_add", x, bias, residual, 0.5, seed=1)
                    check("bias_dropout_add", x, bias, residual, 0.5, seed=1, shard=(3, 13, 29))
                for shape in [(4, 16), (4, 5)]:
                    check("drop_path_add", t(shape, 5), t(shape, 6, dtype=torch.float32), 0.5, seed=1)
                    sample_mask = torch.ops.regdrop.drop_path(torch.empty(shape), 0.5, seed=1)[1]
                    check("drop_path_backward", t(shape, 6, dtype=torch.float32), sample_mask, 0.5, dtype=dtype)
                check("dropout_backward", wide, mask, 0.5, dtype=dtype)
                state = torch.tensor([5, 8])
                check("dropout_low_memory_backward", wide, state, 0.5, dtype=dtype)
                check("dropout_low_memory_backward", wide, state, 0.5, dtype=dtype, shard=(8, 16, 40))


@pytest.mark.parametrize("kernels", ["emulated", pytest.param("cuda", marks=requires_cuda)])
def test_every_cuda_kernel_matches_the_cpu(request, kernels):
    """Every kernel csrc/cuda/kernels.cu builds, run at least once and
    compared with the CPU kernels bit for bit: emulated here (the dry run,
    which also checks that the sweep reaches every kernel, and no other), on
    a GPU the real ones (benchmarks/gpu_check.sh runs it, and runs it again
    under compute-sanitizer). The same launch plan picks the kernels both
    ways."""
    if kernels == "cuda":
        return run_every_kernel(compare_on_gpu)
    emulation = request.getfixturevalue("emulation")
    emulation.take_kernels_run()
    run_every_kernel(lambda op, *args, **kwargs: compare(emulation, op, *args, **kwargs))
    assert set(emulation.take_kernels_run()) == every_kernel_name()


# ----------------------------------------------------------- CUDA generators


@pytest.fixture
def cuda_generator(emulation):
    """Seedless emulated calls draw from a stand-in for PyTorch's CUDA
    generator, through the CUDA backend's own generator code
    (csrc/cuda/philox_state.h); from the CPU generator again afterwards."""
    yield emulation.use_cuda_generator
    emulation.use_cpu_generator()


def test_eager_draws_take_the_cuda_generators_offsets_four_apart(emulation, cuda_generator):
    x = make((1000,), torch.float32)
    cuda_generator(1234, 40, False)
    first, second = emulation.dropout(x, 0.5)[1], emulation.dropout(x, 0.5)[1]
    assert torch.equal(first, torch.ops.regdrop.dropout(x, 0.5, seed=1234, offset=40)[1])
    assert torch.equal(second, torch.ops.regdrop.dropout(x, 0.5, seed=1234, offset=44)[1])


def draws_of_one_graph(kernels, request, x, p):
    """Two dropout draws and a low-memory one captured in one CUDA graph and
    replayed, emulated or on a GPU: (first mask, second mask, the low-memory
    draw's rng_state, and the seed and offset the replay drew at)."""
    if kernels == "emulated":
        emulation, seed, offset = request.getfixturevalue("emulation"), 1234, 40
        emulation.use_cuda_generator(seed, offset, True)
        try:
            first, second = emulation.dropout(x, p)[1], emulation.dropout(x, p)[1]
            rng_state = emulation.dropout_low_memory(x, p)[1]
        finally:
            emulation.use_cpu_generator()
        return first, second, rng_state, seed, offset
    x = x.cuda()
    torch.cuda.manual_seed(1234)

    def draws():
        return torch.ops.regdrop.dropout(x, p)[1], torch.ops.regdrop.dropout(x, p)[1], \
            torch.ops.regdrop.dropout_low_memory(x, p)[1]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        draws()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = draws()
    generator = torch.cuda.default_generators[x.device.index]
    seed, offset = generator.initial_seed(), generator.get_offset()  # what the replay fills in
    graph.replay()
    torch.cuda.synchronize()
    return *(o.cpu() for o in outputs), seed, offset


@pytest.mark.parametrize("kernels", ["emulated", pytest.param("cuda", marks=requires_cuda)])
def test_draws_in_one_captured_graph_read_their_own_streams(request, kernels):
    """Under capture the kernels read the seed and offset through pointers,
    plus each call's offset within the graph: the draws of one graph differ,
    and each is the eager draw at its place in the stream. Emulated here,
    under real capture on a GPU."""
    x = make((1000,), torch.float32)
    first, second, rng_state, seed, offset = draws_of_one_graph(kernels, request, x, 0.5)
    assert not torch.equal(first, second)
    assert torch.equal(first, torch.ops.regdrop.dropout(x, 0.5, seed=seed, offset=offset)[1])
    assert torch.equal(second, torch.ops.regdrop.dropout(x, 0.5, seed=seed, offset=offset + 4)[1])
    assert rng_state.tolist() == [seed, offset + 8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_subnormals_are_kept_under_set_flush_denormal(emulation, dtype):
    """torch.set_flush_denormal(True) sets the calling thread's FTZ and DAZ
    bits. Both devices keep subnormals all the same (csrc/subnormals.h): the
    CPU kernels and the emulated CUDA kernels give the bits they give without
    it, as a GPU, which never flushes, does."""
    tiny = torch.finfo(dtype).tiny  # the smallest normal number

    def subnormals(shape, seed):
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, shape, generator=g, dtype=torch.float64) * 2 - 1
        return (torch.rand(shape, generator=g, dtype=torch.float64) * tiny * signs).to(dtype)

    x, r, b = subnormals((16, 24), 1), subnormals((16, 24), 2), subnormals((24,), 3)
    calls = [("dropout", (x, 0.5), {"seed": 1}), ("dropout_add", (x, r, 0.5), {"seed": 1}),
             ("bias_dropout_add", (x, b, r, 0.5), {"seed": 1}),
             ("bias_dropout_add_backward", (x, torch.ops.regdrop.dropout(x, 0.5, seed=1)[1], 0.5), {})]
    kept = [compare(emulation, op, *args, **kwargs) for op, args, kwargs in calls]
    out = kept[0][0]
    assert ((out != 0) & (out.abs() < tiny)).any(), "no subnormal output to keep"
    if not torch.set_flush_denormal(True):
        pytest.skip("torch.set_flush_denormal is not supported on this CPU")
    try:
        flushed = [compare(emulation, op, *args, **kwargs) for op, args, kwargs in calls]
    finally:
        torch.set_flush_denormal(False)
    for (op, _, _), before, after in zip(calls, kept, flushed):
        for k, (a, e) in enumerate(zip(after, before)):
            same_bits(a, e, f"{op} output {k} under set_flush_denormal(True)")


WIDENING = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", WIDENING, ids=str)
@pytest.mark.parametrize("numel", [5, 8, 4096 + 3])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_emulation_widening_mix(emulation, dtype, numel, aligned):
    """A 16-bit input with a float32 residual and/or bias, and a float32
    output (what autocast makes): every combination, every residual form."""
    x = make((numel,), dtype, seed=1, aligned=aligned)
    rows = make((3, 40), dtype, seed=2, aligned=aligned)
    for residual_dtype in (torch.float32, dtype):
        r = make((numel,), residual_dtype, seed=3, aligned=aligned)
        compare(emulation, "dropout_add", x, r, 0.3, seed=1)
        compare(emulation, "dropout_add_low_memory", x, r, 0.3, seed=1)
        rr = make((3, 40), residual_dtype, seed=4, aligned=aligned)
        for bias_dtype in (torch.float32, dtype):
            compare(emulation, "bias_dropout_add", rows, make((40,), bias_dtype, seed=5, aligned=aligned), rr, 0.3,
                    seed=1)
    for shape in [(4, 16), (3, 13)]:
        compare(emulation, "drop_path_add", make(shape, dtype, seed=6, aligned=aligned),
                make(shape, torch.float32, seed=7, aligned=aligned), 0.3, seed=1)
    # Their gradients, narrowed: a float32 grad into the 16-bit input's, in one pass.
    wide = make((numel,), torch.float32, seed=8, aligned=aligned)
    _, mask = compare(emulation, "dropout_add", x, wide, 0.3, seed=1)
    compare(emulation, "dropout_backward", wide, mask, 0.3, dtype=dtype)
    _, state = compare(emulation, "dropout_add_low_memory", x, wide, 0.3, seed=1)
    compare(emulation, "dropout_low_memory_backward", wide, state, 0.3, dtype=dtype)
    for shape in [(4, 16), (3, 13)]:
        grad = make(shape, torch.float32, seed=9, aligned=aligned)
        compare(emulation, "drop_path_backward", grad, torch.tensor([0b101], dtype=torch.uint8), 0.3, dtype=dtype)


def test_emulation_bias_gradient_of_many_rows(emulation):
    """Chunks, lanes and the chunk fold at a size where each is more than one."""
    for dtype in DTYPES:
        g = make((4096, 40), dtype, seed=8)
        mask = torch.ops.regdrop.dropout(g, 0.5, seed=2)[1]
        compare(emulation, "bias_dropout_add_backward", g, mask, 0.5)


@pytest.mark.parametrize("threads", [1, 3])
def test_emulation_bias_gradient_whatever_the_cpu_split(emulation, threads):
    """The CPU's three ways to split a bias gradient give the plan's bits: one
    thread adds every chunk in turn; threads take runs of chunks (1000 rows
    of 600: 14 chunks), whose sums wait to be added in order; with fewer
    chunks than threads (16 rows: one chunk) they take columns."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in DTYPES:
            for shape in [(1000, 600), (16, 4100)]:
                g = make(shape, dtype, seed=9)
                mask = torch.ops.regdrop.dropout(g, 0.5, seed=3)[1]
                compare(emulation, "bias_dropout_add_backward", g, mask, 0.5)
    finally:
        torch.set_num_threads(previous)


def test_emulation_many_launches_and_large_divisors(emulation, small_launches):
    """With 32-element launches and divisors of 32 and more normalized, every
    op that splits a call or divides goes through those paths."""
    for dtype in (torch.float32, torch.bfloat16):
        x, r = make((1000,), dtype, seed=1), make((1000,), dtype, seed=2)
        _, mask = compare(emulation, "dropout", x, 0.4, seed=1, offset=4)
        compare(emulation, "dropout_add", x, r, 0.4, seed=1)
        compare(emulation, "dropout_backward", r, mask, 0.4)
        _, state = compare(emulation, "dropout_low_memory", x, 0.4, seed=1)
        compare(emulation, "dropout_low_memory_backward", r, state, 0.4)
        for shape in [(3, 100), (10, 37), (4, 5, 9)]:  # samples of 100, 37 and 45 elements
            s, t = make(shape, dtype, seed=3), make(shape, dtype, seed=4)
            _, mask = compare(emulation, "drop_path", s, 0.5, seed=2)
            compare(emulation, "drop_path_add", s, t, 0.5, seed=2)
            compare(emulation, "drop_path_backward", t, mask, 0.5)
        for shape, channels_last in [((3, 2, 40), False), ((2, 3, 7, 7), False), ((3, 12, 5, 5), True),
                                     ((2, 9, 4, 1), True)]:
            c = make(shape, dtype, seed=5, channels_last=channels_last)
            _, mask = compare(emulation, "channel_dropout", c, 0.5, seed=3)
            compare(emulation, "channel_dropout_backward", c, mask, 0.5)
        for rows, cols in [(10, 100), (30, 33), (5, 8)]:
            a, b, res = make((rows, cols), dtype, seed=6), make((cols,), dtype, seed=7), make((rows, cols), dtype, 8)
            _, mask = compare(emulation, "bias_dropout_add", a, b, res, 0.5, seed=4)
            compare(emulation, "bias_dropout_add_backward", res, mask, 0.5)


# (first, run, stride): whole groups of the larger call, runs starting inside
# a group, runs that are not whole groups, runs shorter than a group, a run
# longer than the call, and units past 2^32.
SHARDS = [(8, 16, 40), (3, 16, 40), (5, 13, 29), (1, 3, 8), (7, 1, 3), (9, 1000, 1000), (2**40 + 3, 21, 2**33)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shard", SHARDS, ids=str)
@pytest.mark.parametrize("launches", ["one launch", "small launches"])
def test_emulation_sharded_draws(emulation, request, dtype, shard, launches):
    """A shard's draws (the DrawShard kernels and unit masks) on every
    (first, run, stride) shape, in one launch and split into 32-element
    launches whose run divisors are normalized."""
    if launches == "small launches":
        request.getfixturevalue("small_launches")
    x, r = make((7, 43), dtype, seed=1), make((7, 43), dtype, seed=2)
    b = make((43,), dtype, seed=3)
    compare(emulation, "dropout", x, 0.5, seed=3, offset=8, shard=shard)
    compare(emulation, "dropout_add", x, r, 0.5, seed=3, shard=shard)
    compare(emulation, "bias_dropout_add", x, b, r, 0.5, seed=3, shard=shard)
    compare(emulation, "dropout_", x, OPS["dropout_"].new_mask(x), 0.5, seed=3, shard=shard)
    _, state = compare(emulation, "dropout_low_memory", x, 0.5, seed=3, shard=shard)
    compare(emulation, "dropout_low_memory_backward", r, state, 0.5, shard=shard)
    compare(emulation, "drop_path", make((77, 3), dtype, seed=4), 0.5, seed=3, shard=shard)
    compare(emulation, "channel_dropout", make((5, 11, 2), dtype, seed=5), 0.5, seed=3, shard=shard)
    if dtype in (torch.float16, torch.bfloat16):  # the widening mix
        wide = make((7, 43), torch.float32, seed=6)
        compare(emulation, "dropout_add", x, wide, 0.5, seed=3, shard=shard)
        compare(emulation, "bias_dropout_add", x, b.float(), wide, 0.5, seed=3, shard=shard)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_emulation_agrees_with_the_gpu(emulation, dtype, aligned):
    """Where a GPU is present: the emulated kernels and the real ones give the
    same bits, so the emulation is a faithful stand-in where none is."""

    def both(op, *args, **kwargs):
        on_gpu = getattr(torch.ops.regdrop, op)(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args),
                                                **kwargs)
        emulated = getattr(emulation, op)(*args, **kwargs)
        for k, (g, e) in enumerate(zip(on_gpu, emulated)):
            same_bits(g.cpu(), e, f"{op} output {k}")
        return emulated

    x, r = make((37, 129), dtype, seed=1, aligned=aligned), make((37, 129), dtype, seed=2, aligned=aligned)
    b = make((129,), dtype, seed=3, aligned=aligned)
    _, mask = both("dropout", x, 0.3, seed=1, offset=8)
    both("dropout_add", x, r, 0.3, seed=1)
    both("bias_dropout_add", x, b, r, 0.3, seed=1)
    both("bias_dropout_add_backward", r, mask, 0.3)
    both("drop_path_add", x, r, 0.3, seed=1)
    c = make((4, 12, 5, 5), dtype, seed=4, aligned=aligned, channels_last=True)
    both("channel_dropout", c, 0.3, seed=1)
    both("channel_dropout", c.contiguous(), 0.3, seed=1)
