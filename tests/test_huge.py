"""Tensors of more than 2^31 elements: 64-bit indexing end to end.

2^31 + 17 float16 elements on the CPU: 4 GiB in, 4 GiB out and 256 MiB of
mask. The tail, past element 2^31, is checked against the seeded reference.
On a GPU the same test runs where memory allows.
"""

import numpy as np
import pytest
import torch

from reference import keep_bits, keep_scale, masked_reference, unpack_bits

ops = torch.ops.regdrop

N = 2**31 + 17
TAIL = 4096 + 17  # checked elements: from 2^31 - 4096 to the end
SEED, OFFSET, P = 11, 8, 0.3


def enough_memory(device, needed):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free > needed
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") > needed


def zeros(n, device):
    """n float16 zeros. On the CPU, numpy's zeros come from calloc, whose fresh
    pages are mapped on first write: the ops read the untouched bulk as the
    zero page, and the test pays for its three outputs' pages alone (the
    allocation of fresh pages dominates this test's time)."""
    if device == "cpu":
        return torch.from_numpy(np.zeros(n, dtype=np.float16))
    return torch.zeros(n, dtype=torch.float16, device=device)


@pytest.mark.slow
def test_more_than_2_31_elements(device):
    if not enough_memory(device, 9 * 2**30):
        pytest.skip("needs 9 GiB free")
    x = zeros(N, device)
    x[-TAIL:] = torch.randn(TAIL, dtype=torch.float16, device=device)
    first = N - TAIL  # a multiple of 8: the tail starts a group
    assert first % 8 == 0
    expected_bits = torch.from_numpy(keep_bits(SEED, OFFSET, TAIL, P, first_group=first // 8))

    out, mask = ops.dropout(x, P, seed=SEED, offset=OFFSET)
    assert mask.numel() == (N + 7) // 8
    assert torch.equal(unpack_bits(mask[first // 8 :], TAIL), expected_bits)
    keep = expected_bits.to(device)
    tail_reference = masked_reference(x[-TAIL:], keep, keep_scale(P))
    assert torch.equal(out[-TAIL:], tail_reference)
    del out

    grad = ops.dropout_backward(x, mask, P)
    assert torch.equal(grad[-TAIL:], tail_reference)
    del grad

    # One sample of 2^31 + 17 elements: the unit walk indexes past 2^31 too.
    out, sample_mask = ops.drop_path(x.view(1, N), P, True, seed=SEED, offset=OFFSET)
    kept = bool(unpack_bits(sample_mask, 1)[0])
    assert kept == bool(keep_bits(SEED, OFFSET, 1, P)[0])
    tail = out.view(N)[-TAIL:]
    assert torch.equal(tail, masked_reference(x[-TAIL:], torch.full_like(keep, kept), keep_scale(P)))
