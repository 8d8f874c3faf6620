"""The random mapping: Philox4x32-10 and (seed, offset, unit) -> keep bit.

The masks must equal the documented mapping (reference.py) bit for bit, on
every device, for every CPU instruction set and thread count.
"""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import requires_cuda
from reference import keep_bits, pack_bits, philox4x32_10

ops = torch.ops.regdrop


@pytest.mark.parametrize(
    "ctr, key, expected",
    [  # Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_reference_philox_known_answers(ctr, key, expected):
    words = philox4x32_10([np.array([c], dtype=np.uint64) for c in ctr], key)
    assert tuple(int(w[0]) for w in words) == expected


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 127, 128, 129, 4095, 100_003])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.97, 1.0])
@pytest.mark.parametrize(
    "seed, offset",
    [(0, 0), (1, 4), (-1, 2**40 + 12), (2**63 - 1, 2**63 - 4), (123456789, 2**32 - 4)],
)
def test_masks_follow_the_documented_mapping(device, numel, p, seed, offset):
    x = torch.ones(numel, device=device)
    _, mask = ops.dropout(x, p, seed=seed, offset=offset)
    expected = pack_bits(keep_bits(seed, offset, numel, p))
    assert torch.equal(mask.cpu(), expected)


def test_masks_do_not_depend_on_thread_count():
    x = torch.randn(1 << 20)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.dropout(x, 0.3, seed=5, offset=8))
    finally:
        torch.set_num_threads(previous)
    for out, mask in results[1:]:
        assert torch.equal(mask, results[0][1])
        assert torch.equal(out, results[0][0])


_ISA_SCRIPT = """
import json, torch, regdrop_ext
ops = torch.ops.regdrop
out = {}
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    # Built in Python: torch's own vectorized kernels differ across ISAs.
    def values(n, shift):
        return torch.tensor([((i * 37 + shift) % 1001 - 500) / 97.0 for i in range(n)]).to(dtype)
    x, r = values(1003, 0), values(1003, 11)
    rows, bias13, bias17 = values(3 * 17 * 13, 5), values(13, 3), values(17, 7)
    calls = {
        "dropout": lambda: ops.dropout(x, 0.3, seed=11, offset=4),
        "dropout_add": lambda: ops.dropout_add(x, r, 0.3, seed=11, offset=4),
        "bias_dropout_add": lambda: ops.bias_dropout_add(rows.view(-1, 13), bias13, rows.view(-1, 13), 0.3, seed=1),
        "bias_dropout_add_17": lambda: ops.bias_dropout_add(rows.view(-1, 17), bias17, rows.view(-1, 17), 0.3, seed=1),
        "drop_path": lambda: ops.drop_path(rows.view(39, 17), 0.5, seed=2),
        "drop_path_add": lambda: ops.drop_path_add(rows.view(3, 221), rows.view(3, 221), 0.5, seed=2),
        "channel": lambda: ops.channel_dropout(rows.view(3, 17, 13), 0.5, seed=3),
        "channel_last": lambda: ops.channel_dropout(rows.view(3, 13, 17).transpose(1, 2), 0.5, seed=3),
    }
    for name, call in calls.items():
        y, mask = call()
        out[f"{dtype} {name}"] = [mask.tolist(), y.double().tolist()]
    mask = ops.dropout(x, 0.3, seed=11, offset=4)[1]
    grad, grad_bias = ops.bias_dropout_add_backward(rows.view(-1, 13), ops.dropout(rows, 0.3, seed=5)[1], 0.3)
    out[f"{dtype} backward"] = [ops.dropout_backward(x, mask, 0.3).double().tolist(), grad.double().tolist()]
    out[f"{dtype} bias grad"] = grad_bias.double().tolist()
    if dtype in (torch.float32, torch.float16):  # a float vector stored, and a 16-bit one
        out[f"{dtype} streamed"] = streamed(dtype)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "results": out}))
"""

# Outputs of 16 MiB and more are written with non-temporal stores (kernels.h,
# stream_output; where their pages are in memory already, and always in this
# script, REGDROP_STREAMING_STORES=always): whether each such output equals
# its reference, built from the op's own mask (the masks themselves are
# checked above and elsewhere).
_STREAMED = """
def streamed(dtype):
    n = ((16 << 20) // torch.empty(0, dtype=dtype).element_size() // 4101 + 1) * 4101  # rows of 4101: unaligned
    x = (((torch.arange(n) * 37) % 1001 - 500) / 97.0).to(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(65536 / (65536 - round(0.3 * 65536)), dtype=torch.float64).to(compute)
    def through(keep, v):
        return torch.where(keep, (v.to(compute) * scale).to(dtype), torch.zeros((), dtype=dtype))
    def bits(mask, units):
        return ((mask.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:units].bool()
    y, mask = ops.dropout(x, 0.3, seed=11, offset=4)
    expected = through(bits(mask, n), x)
    results = [torch.equal(y, expected), torch.equal(ops.dropout_backward(x, mask, 0.3), expected)]
    grad, _ = ops.bias_dropout_add_backward(x.view(-1, 4101), mask, 0.3)
    results.append(torch.equal(grad.view(-1), expected))
    samples = x.view(4101, -1)
    y, sample_mask = ops.drop_path(samples, 0.3, seed=2)
    keep = bits(sample_mask, 4101).unsqueeze(1).expand_as(samples)
    results.append(torch.equal(y, through(keep, samples)))
    return results
"""
_ISA_SCRIPT = _ISA_SCRIPT.replace("out = {}\n", "out = {}\n" + _STREAMED, 1)


@functools.cache
def _baseline_run():
    return _run_with_capability("default")


def _run_with_capability(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, REGDROP_STREAMING_STORES="always")
    done = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_every_cpu_instruction_set_gives_identical_results(capability):
    """Each CPU kernel copy (baseline, AVX2, AVX-512) is selected through
    ATEN_CPU_CAPABILITY; the vector Philox lanes, chunks, tails, bias columns,
    conversions and bias gradients (added in an order fixed by the shape
    alone) of each must agree bit for bit with the baseline's, for every op.
    Outputs past 16 MiB, written with non-temporal stores, equal their
    references."""
    # ATEN_CPU_CAPABILITY only lowers what the CPU offers: where this process runs
    # with all of it, it says without starting another whether the CPU has the set.
    here = torch.backends.cpu.get_cpu_capability().lower()
    ranks = ["default", "avx2", "avx512"]
    lower = here not in ranks or ranks.index(here) < ranks.index(capability)
    if lower and "ATEN_CPU_CAPABILITY" not in os.environ:
        pytest.skip(f"this CPU has no {capability.upper()}: torch runs {here.upper()}, and so would regdrop")
    baseline = _baseline_run()
    assert baseline["capability"] == "DEFAULT"
    run = _run_with_capability(capability)
    if run["capability"] != capability.upper():
        pytest.skip(f"this CPU has no {capability.upper()}: torch runs {run['capability']}, and so would regdrop")
    for done in (baseline, run):
        for key, value in done["results"].items():
            if key.endswith("streamed"):
                assert value == [True] * 4, f"{done['capability']} {key}: dropout, backward, bias grad, drop_path"
    for key, value in baseline["results"].items():
        assert run["results"][key] == value, key


@requires_cuda
@pytest.mark.parametrize("numel", [1, 9, 1000, 65536 * 8 + 3, 3_000_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_cuda_masks_are_identical(numel, dtype):
    x = torch.randn(numel, dtype=dtype)
    out_cpu, mask_cpu = ops.dropout(x, 0.2, seed=7, offset=12)
    out_cuda, mask_cuda = ops.dropout(x.cuda(), 0.2, seed=7, offset=12)
    assert torch.equal(mask_cpu, mask_cuda.cpu())
    assert torch.equal(out_cpu, out_cuda.cpu())
