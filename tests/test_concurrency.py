"""Ops called from several threads, and failures that must not change state."""

import threading

import pytest
import torch

from conftest import requires_cuda
from helpers import in_place

ops = torch.ops.regdrop


def test_threads_sharing_a_generator_draw_distinct_streams(device):
    """The generator lock gives each call its own stream: the masks drawn by
    4 threads are exactly the masks of the same calls made one after another,
    and the generator ends in the same state."""
    threads, calls = 4, 25
    x = torch.ones(1 << 15, device=device)
    shared = torch.Generator(device=device)
    shared.manual_seed(0)
    drawn = [[] for _ in range(threads)]

    def work(i):
        for _ in range(calls):
            drawn[i].append(ops.dropout(x, 0.5, shared)[1].cpu())

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    sequential = torch.Generator(device=device)
    sequential.manual_seed(0)
    expected = [ops.dropout(x, 0.5, sequential)[1].cpu() for _ in range(threads * calls)]
    as_set = lambda masks: {bytes(m.numpy()) for m in masks}  # noqa: E731
    assert as_set(m for per_thread in drawn for m in per_thread) == as_set(expected)
    assert len(as_set(expected)) == threads * calls
    assert torch.equal(shared.get_state(), sequential.get_state())


@requires_cuda
def test_two_cuda_streams_at_once():
    x = torch.randn(1 << 22, device="cuda")
    expected = [ops.dropout(x, 0.5, seed=s, offset=0) for s in (1, 2)]
    streams = [torch.cuda.Stream() for _ in range(2)]
    results = [None, None]
    torch.cuda.synchronize()
    for i, (stream, seed) in enumerate(zip(streams, (1, 2))):
        with torch.cuda.stream(stream):
            results[i] = ops.dropout(x, 0.5, seed=seed, offset=0)
    torch.cuda.synchronize()
    for (out, mask), (expected_out, expected_mask) in zip(results, expected):
        assert torch.equal(mask, expected_mask) and torch.equal(out, expected_out)


FAILING_CALLS = {  # call, the exception, and what its message names
    "dropout": (lambda x, g: ops.dropout(x, 1.5, g), ValueError, "p must be a probability"),
    "dropout_": (lambda x, g: in_place("dropout_", x, -0.1, g), ValueError, "p must be a probability"),
    "dropout_ overlapping": (lambda x, g: in_place("dropout_", x[:1].expand(4, 64), 0.5, g), RuntimeError,
                             "input has elements that share memory"),
    "dropout_add": (lambda x, g: ops.dropout_add(x, x[:2], 0.5, g), RuntimeError, "residual must have the shape"),
    "bias_dropout_add": (lambda x, g: ops.bias_dropout_add(x, x[0, :3], x, 0.5, g), RuntimeError,
                         "bias must be 1-D with the size of input's last dimension"),
    "channel_dropout_": (lambda x, g: in_place("channel_dropout_", x.view(-1), 0.5, g), RuntimeError,
                         r"input must have shape \(N, C, \*\)"),
    "drop_path_add": (lambda x, g: ops.drop_path_add(x, x.int(), 0.5, True, g), TypeError,
                      "residual must be float32"),
    "dropout_low_memory": (lambda x, g: ops.dropout_low_memory(x.int(), 0.5, g), TypeError, "input must be float32"),
    "generator and seed": (lambda x, g: ops.dropout(x, 0.5, g, seed=3), RuntimeError, "either generator or seed"),
}


@pytest.mark.parametrize("name", FAILING_CALLS)
def test_a_failing_call_changes_nothing(device, name):
    """Each call raises its own error, naming what is wrong, and leaves its
    input and the generator as they were."""
    x = torch.randn(4, 64, device=device)
    before = x.clone()
    g = torch.Generator(device=device)
    g.manual_seed(9)
    state = g.get_state()
    call, error, message = FAILING_CALLS[name]
    with pytest.raises(error, match=message):
        call(x, g)
    assert torch.equal(x, before)
    assert torch.equal(g.get_state(), state)
