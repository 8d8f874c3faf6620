"""What only a GPU can check: CUDA graphs, CPU/CUDA bit parity across launch
shapes, and the fallback from 128-bit loads. Skipped without a GPU; the RNG
battery, the huge-tensor test and the two-stream test also run on CUDA."""

import pytest
import torch

import regdrop_ext
from conftest import requires_cuda
from helpers import call_op
from regdrop_ext import manifest

ops = torch.ops.regdrop
pytestmark = requires_cuda


def capture(fn):
    """A CUDA graph of fn() (warmed up on a side stream) and its outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def replay_masks(graph, mask, times):
    masks = []
    for _ in range(times):
        graph.replay()
        masks.append(mask.clone())
    torch.cuda.synchronize()
    return masks


@pytest.mark.parametrize(
    "op",
    [
        lambda x: ops.dropout(x, 0.5),
        lambda x: ops.drop_path(x.view(64, -1), 0.5),
        lambda x: ops.channel_dropout(x.view(16, 64, -1), 0.5),
        lambda x: ops.dropout_add(x, x, 0.5),
    ],
    ids=["dropout", "drop_path", "channel_dropout", "dropout_add"],
)
def test_graph_replays_draw_new_masks_and_reseeding_reproduces_them(op):
    x = torch.randn(1 << 16, device="cuda")
    graph, (_, mask) = capture(lambda: op(x))
    torch.manual_seed(123)
    first = replay_masks(graph, mask, 4)
    assert len({bytes(m.cpu().numpy()) for m in first}) == 4
    torch.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(first, replay_masks(graph, mask, 4)))


def test_graph_records_the_stream_it_drew_with():
    """dropout_low_memory's rng_state, written by the kernel at replay time,
    names the stream the replay used: the masked op reproduces its output."""
    x = torch.randn(10_000, device="cuda")
    graph, (out, rng_state) = capture(lambda: ops.dropout_low_memory(x, 0.3))
    for _ in range(3):
        graph.replay()
        seed, offset = rng_state.tolist()
        assert torch.equal(out, ops.dropout(x, 0.3, seed=seed, offset=offset)[0])


def test_graph_captures_forward_and_low_memory_backward():
    x = torch.randn(4096, device="cuda", requires_grad=True)
    grad = torch.randn(4096, device="cuda")

    def step():
        x.grad = None
        out = regdrop_ext.dropout(x, 0.5, low_memory=True)
        out.backward(grad)
        return out, x.grad

    graph, (out, x_grad) = capture(step)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        keep = out != 0
        torch.testing.assert_close(x_grad, torch.where(keep, grad * 2, 0.0))


def test_compile_reduce_overhead_draws_new_masks():
    torch._dynamo.reset()
    f = torch.compile(lambda t: regdrop_ext.dropout(t, 0.5) + 1, mode="reduce-overhead")
    x = torch.randn(1 << 14, device="cuda")
    torch.manual_seed(7)
    first = [f(x).clone() for _ in range(4)]
    assert len({bytes((t != 1).cpu().numpy()) for t in first}) == 4
    torch.manual_seed(7)
    second = [f(x).clone() for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("numel", [1, 7, 8, 2047, 2048, 2049, 256 * 8 * 3 + 5, (1 << 22) + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_masks_and_outputs_match_the_cpu_across_launch_shapes(numel, dtype):
    x = torch.randn(numel, dtype=dtype)
    r = torch.randn(numel, dtype=dtype)
    for call in (
        lambda t, r: ops.dropout(t, 0.25, seed=5, offset=4),
        lambda t, r: ops.dropout_add(t, r, 0.25, seed=5, offset=4),
        lambda t, r: ops.dropout_low_memory(t, 0.25, seed=5, offset=4),
    ):
        cpu = call(x, r)
        cuda = call(x.cuda(), r.cuda())
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, cuda))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_misaligned_inputs_fall_back_from_vector_loads(dtype):
    storage = torch.randn(4099, dtype=dtype, device="cuda")
    x, r = storage[1:4097], storage[3:4099]  # storage offsets 1 and 3: not 16-byte aligned
    for misaligned, aligned in (((x,), (x.clone(),)), ((x, r), (x.clone(), r.clone()))):
        op = ops.dropout if len(misaligned) == 1 else ops.dropout_add
        expected = op(*aligned, 0.5, seed=3, offset=0)
        actual = op(*misaligned, 0.5, seed=3, offset=0)
        assert all(torch.equal(a, b) for a, b in zip(actual, expected))
    grad = storage[1:4097]
    mask = ops.dropout(x, 0.5, seed=3)[1]
    assert torch.equal(ops.dropout_backward(grad, mask, 0.5), ops.dropout_backward(grad.clone(), mask, 0.5))


def bits(t):
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "rows, cols", [(300, 77), (64 * 1025 + 3, 1), (64 * 1025 + 3, 31), (2 * 1025, 33), (70, 32 * 1025 + 1), (1, 4096)]
)
def test_bias_gradient_matches_the_cpu_bit_for_bit(dtype, rows, cols):
    """Both devices add the column sums in the order column_sums.h fixes."""
    x = torch.randn(rows, cols).to(dtype)
    mask = ops.dropout(x, 0.4, seed=1)[1]
    cpu = ops.bias_dropout_add_backward(x, mask, 0.4)
    cuda = ops.bias_dropout_add_backward(x.cuda(), mask.cuda(), 0.4)
    assert torch.equal(bits(cpu[0]), bits(cuda[0].cpu()))
    assert torch.equal(bits(cpu[1]), bits(cuda[1].cpu()))


def test_generator_of_another_device_type_is_refused():
    x = torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError, match="generator"):
        ops.dropout(x, 0.5, torch.Generator())


# --- CUDA graphs: forward and backward, a new mask every replay ----------------------


def _replayed_step(step, replays=3):
    """Captures step() (a forward and a backward) and replays it; yields the
    outputs after each replay."""
    graph, outputs = capture(step)
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        yield [o.clone() for o in outputs]


@pytest.mark.parametrize("op", ["bias_dropout_add", "drop_path_add", "channel_dropout"])
def test_graph_replays_of_forward_and_backward_follow_each_replays_mask(op):
    x = torch.randn(8, 16, 32, device="cuda", requires_grad=True)
    r = torch.randn(8, 16, 32, device="cuda")
    b = torch.randn(32, device="cuda", requires_grad=True)
    grad = torch.randn(8, 16, 32, device="cuda")

    def step():
        x.grad, b.grad = None, None
        if op == "bias_dropout_add":
            out = regdrop_ext.bias_dropout_add(x, b, r, 0.5)
        elif op == "drop_path_add":
            out = regdrop_ext.drop_path_add(x, r, 0.5)
        else:
            out = regdrop_ext.dropout1d(x, 0.5)
        out.backward(grad)
        return out, x.grad, (b.grad if op == "bias_dropout_add" else x.grad)

    seen = set()
    for out, x_grad, b_grad in _replayed_step(step):
        dropped = out - (r if op != "channel_dropout" else 0)
        if op == "bias_dropout_add":
            keep = dropped != 0
            torch.testing.assert_close(x_grad, torch.where(keep, grad * 2, 0.0))
            torch.testing.assert_close(b_grad, x_grad.sum((0, 1)))
        elif op == "drop_path_add":
            keep = (dropped != 0).flatten(1).any(1).view(-1, 1, 1)
            torch.testing.assert_close(x_grad, torch.where(keep, grad * 2, 0.0))
        else:
            keep = (out != 0).any(-1, keepdim=True)
            torch.testing.assert_close(x_grad, torch.where(keep, grad * 2, 0.0))
        seen.add(bytes(keep.cpu().numpy()))
    assert len(seen) == 3, "a replay drew the same mask as another"


def test_graphed_low_memory_callable_backward_uses_the_latest_forward():
    """make_graphed_callables: forward replayed twice, then backward once,
    draws its mask from the second forward's rng_state."""
    layer = regdrop_ext.Dropout(0.5, low_memory=True)
    x = torch.randn(4096, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    graphed(x)
    out = graphed(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, torch.where(out != 0, 2.0, 0.0))


# --- two GPUs --------------------------------------------------------------------------

requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _generator_offsets():
    return [torch.cuda.default_generators[d].get_offset() for d in range(2)]


@requires_two_gpus
def test_an_op_on_the_second_gpu_runs_there_and_draws_from_its_generator():
    with torch.cuda.device(0):
        x = torch.randn(4096, device="cuda:1")
        before = _generator_offsets()
        out, mask = ops.dropout(x, 0.5)
        low, rng_state = ops.dropout_low_memory(x, 0.5)
        after = _generator_offsets()
    assert out.device == mask.device == low.device == rng_state.device == torch.device("cuda:1")
    assert after[0] == before[0] and after[1] > before[1]
    seed, offset = rng_state.tolist()
    assert torch.equal(low, ops.dropout(x, 0.5, seed=seed, offset=offset)[0])


@requires_two_gpus
def test_an_op_on_the_second_gpu_under_graph_capture():
    x = torch.randn(4096, device="cuda:1")
    with torch.cuda.device(1):
        graph, (out, rng_state) = capture(lambda: ops.dropout_low_memory(x, 0.5))
    with torch.cuda.device(0):
        before = _generator_offsets()
        graph.replay()
        torch.cuda.synchronize(1)
        after = _generator_offsets()
    seed, offset = rng_state.tolist()
    assert torch.equal(out, ops.dropout(x, 0.5, seed=seed, offset=offset)[0])
    assert after[0] == before[0] and after[1] > before[1]


@requires_two_gpus
def test_a_generator_of_the_other_gpu_is_refused():
    x = torch.randn(64, device="cuda:0")
    before = torch.cuda.default_generators[1].get_offset()
    with pytest.raises(RuntimeError, match=r"generator must be a generator of input's device \(cuda:0\)"):
        ops.dropout(x, 0.5, torch.Generator("cuda:1"))
    assert torch.cuda.default_generators[1].get_offset() == before


@requires_cuda
@pytest.mark.parametrize("input_device, generator_device", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_generator_of_another_device_type_is_refused_by_name(input_device, generator_device):
    """Every random op, with a generator of the wrong device: an error naming
    the argument and both devices, before anything is drawn."""
    x = torch.randn(4, 8, device=input_device)
    for op in manifest.ops("masked", "low_memory", "in_place"):
        with pytest.raises(RuntimeError, match=f"generator must be a generator of input's device.*{generator_device}"):
            call_op(op, x.clone(), 0.5, residual=x, bias=x[0], generator=torch.Generator(generator_device))


@requires_two_gpus
def test_shared_random_state_draws_on_the_device_current_when_entered():
    shared = regdrop_ext.SharedRandomState(5)  # made while cuda:0 is current
    with torch.cuda.device(1):
        own = torch.cuda.get_rng_state(1)
        zero = torch.cuda.get_rng_state(0)
        with shared:
            a = ops.dropout(torch.ones(4096, device="cuda:1"), 0.5)[1]
        assert torch.equal(torch.cuda.get_rng_state(1), own)
        assert torch.equal(torch.cuda.get_rng_state(0), zero)
    torch.cuda.manual_seed_all(5)
    assert torch.equal(a, ops.dropout(torch.ones(4096, device="cuda:1"), 0.5)[1])
