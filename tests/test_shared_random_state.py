"""SharedRandomState within one process. Across processes it is checked where it
is used: DDP training on two ranks (per-rank masks from seed_ranks, shared ones
identical) is examples/ddp_train.py, run by tests/test_examples.py."""

import torch

import regdrop_ext


def mask() -> torch.Tensor:
    """4096 dropout draws: two unrelated ones agree with probability 2^-4096."""
    return regdrop_ext.dropout(torch.ones(4096), 0.5) != 0


def test_shared_state_leaves_the_own_stream_as_if_nothing_was_drawn():
    torch.manual_seed(3)
    expected = mask()
    torch.manual_seed(3)
    shared = regdrop_ext.SharedRandomState(7)
    with shared:
        mask()
    assert torch.equal(mask(), expected)


def test_shared_state_replays_from_its_seed_and_moves_on():
    first, second = regdrop_ext.SharedRandomState(7), regdrop_ext.SharedRandomState(7)
    with first:
        a = mask()
    with first:
        b = mask()
    with second:
        assert torch.equal(mask(), a)
    assert not torch.equal(a, b)
