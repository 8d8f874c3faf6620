"""What only a GPU can check: CUDA graphs, CPU/CUDA bit parity across launch
shapes, and the fallback from 128-bit loads. Skipped without a GPU; the RNG
battery, the huge-tensor test and the two-stream test also run on CUDA."""

import pytest
import torch

import regdrop_ext
from conftest import requires_cuda

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


def test_bias_gradient_matches_the_cpu():
    x = torch.randn(300, 77, dtype=torch.float64)
    out, mask = ops.dropout(x, 0.4, seed=1)
    cpu = ops.bias_dropout_add_backward(x, mask, 0.4)
    cuda = ops.bias_dropout_add_backward(x.cuda(), mask.cuda(), 0.4)
    assert torch.equal(cpu[0], cuda[0].cpu())
    torch.testing.assert_close(cpu[1], cuda[1].cpu())


def test_generator_on_another_device_is_refused():
    x = torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError, match="generator"):
        ops.dropout(x, 0.5, torch.Generator())
