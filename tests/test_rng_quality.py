"""RNG quality battery on large masks (>= 16M bits), on every device present.

A mask that repeats a pattern, biases one bit lane or returns the same bits
twice damages training silently; each check here looks for one such failure.
Every statistic is turned into a z-score of a distribution it follows when
the bits are independent Bernoulli draws, and must stay within SIGMAS = 5
(two-sided tail 5.7e-7). The run computes about 400 z-scores, so a correct
generator fails it with probability about 2e-4; per-lane counts are pooled
into one chi-square per modulus to keep that number small. The last test
feeds each check deliberately flawed bits, to show that it can fail.
"""

import math

import numpy as np
import pytest
import torch

ops = torch.ops.regdrop

SIGMAS = 5.0
N = 1 << 24  # bits per mask


def draw_bits(device, n=N, p=0.5, **rng) -> np.ndarray:
    """n keep bits (uint8 0/1) from one dropout call."""
    _, mask = ops.dropout(torch.ones(n, dtype=torch.float16, device=device), p, **rng)
    return np.unpackbits(mask.cpu().numpy(), bitorder="little")[:n]


def keep_probability(p: float) -> float:
    return 1 - round(p * 65536) / 65536


def binomial_z(count, n, q):
    return (count - n * q) / math.sqrt(n * q * (1 - q))


def chi_square_z(chi2, dof):
    """Wilson-Hilferty: (chi2/dof)^(1/3) is close to normal."""
    mean = 1 - 2 / (9 * dof)
    return ((chi2 / dof) ** (1 / 3) - mean) / math.sqrt(2 / (9 * dof))


def assert_within(z, what):
    assert abs(z) < SIGMAS, f"{what}: z = {z:.2f} beyond {SIGMAS} sigma"


@pytest.mark.parametrize(
    "p", [2**-16, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1 - 2**-16]
)
def test_keep_rate(device, p):
    """Includes p = 2^-16 and 1 - 2^-16: only a full 16-bit uniform gets those right."""
    bits = draw_bits(device, p=p)
    assert_within(binomial_z(int(bits.sum()), N, keep_probability(p)), f"keep rate at p={p}")


LAGS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 128, 4096, 2**20)


def check_serial_correlation(bits, lags=LAGS):
    centered = bits.astype(np.float64) - bits.mean()
    variance = centered.var()
    n = len(bits)
    for lag in lags:
        r = np.dot(centered[:-lag], centered[lag:]) / ((n - lag) * variance)
        assert_within(r * math.sqrt(n - lag), f"correlation at lag {lag}")


def check_lanes(bits, q):
    """For each modulus m in 2..64, the keep counts of the m residue classes
    i mod m: one chi-square (m - 1 degrees of freedom) per modulus."""
    for m in range(2, 65):
        rows = len(bits) // m
        counts = bits[: rows * m].reshape(rows, m).sum(axis=0, dtype=np.int64)
        expected = rows * q
        chi2 = float(((counts - expected) ** 2).sum() / (rows * q * (1 - q)))
        assert_within(chi_square_z(chi2, m - 1), f"lane bias mod {m}")


def check_byte_windows(bits, q):
    """Byte values of 8-bit windows at each of the 8 alignments; the expected
    frequency of a byte with k ones is q^k (1 - q)^(8 - k)."""
    ones = np.array([bin(v).count("1") for v in range(256)])
    probability = q**ones * (1 - q) ** (8 - ones)
    usable = (len(bits) - 8) // 8 * 8
    for start in range(8):
        windows = np.packbits(bits[start : start + usable].reshape(-1, 8), axis=1, bitorder="little")
        counts = np.bincount(windows.reshape(-1), minlength=256)
        expected = probability * counts.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert_within(chi_square_z(chi2, 255), f"8-bit windows at alignment {start}")


def check_runs(bits):
    """Wald-Wolfowitz runs test."""
    n = len(bits)
    n1 = int(bits.sum())
    n0 = n - n1
    runs = 1 + int(np.count_nonzero(bits[1:] != bits[:-1]))
    mean = 2 * n1 * n0 / n + 1
    variance = 2 * n1 * n0 * (2 * n1 * n0 - n) / (n**2 * (n - 1))
    assert_within((runs - mean) / math.sqrt(variance), "number of runs")


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_serial_correlation(device, p):
    check_serial_correlation(draw_bits(device, p=p))


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_no_lane_is_biased(device, p):
    check_lanes(draw_bits(device, p=p), keep_probability(p))


@pytest.mark.parametrize("shape", [(1 << 18, 64), (1 << 16, 256), (4096, 4096), (2048, 8200)])
def test_no_repeated_rows(device, shape):
    rows, cols = shape
    x = torch.ones(shape, dtype=torch.float16, device=device)
    _, mask = ops.dropout(x, 0.5)
    bits = np.unpackbits(mask.cpu().numpy(), bitorder="little")[: rows * cols].reshape(rows, cols)
    packed = np.packbits(bits, axis=1)
    unique = np.unique(packed.view(np.dtype((np.void, packed.shape[1]))))
    assert len(unique) == rows


def test_consecutive_calls_are_independent(device):
    torch.manual_seed(0)
    a = draw_bits(device).astype(np.float64)
    b = draw_bits(device).astype(np.float64)
    r = np.corrcoef(a, b)[0, 1]
    assert_within(r * math.sqrt(N), "correlation of consecutive calls")
    # Two independent fair masks differ in half of the bits.
    assert_within(binomial_z(int((a != b).sum()), N, 0.5), "disagreement of consecutive calls")


def test_many_small_calls_are_independent(device):
    calls, size = 4096, 4096
    torch.manual_seed(1)
    x = torch.ones(size, dtype=torch.float16, device=device)
    masks = torch.stack([ops.dropout(x, 0.5)[1] for _ in range(calls)]).cpu().numpy()
    assert len(np.unique(masks.view(np.dtype((np.void, masks.shape[1]))))) == calls
    bits = np.unpackbits(masks, axis=1, bitorder="little").reshape(-1).astype(np.float64)
    n = bits.size
    assert_within(binomial_z(int(bits.sum()), n, 0.5), "keep rate over small calls")
    centered = bits - bits.mean()
    for lag in (1, size, 2 * size):  # within a call, and call to call
        r = np.dot(centered[:-lag], centered[lag:]) / ((n - lag) * centered.var())
        assert_within(r * math.sqrt(n - lag), f"correlation at lag {lag} over small calls")


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_chi_square_of_8_bit_windows(device, p):
    check_byte_windows(draw_bits(device, p=p), keep_probability(p))


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_runs(device, p):
    check_runs(draw_bits(device, p=p))


def test_both_halves_of_every_philox_word_are_uniform(device):
    """Unit 8g + j takes the low (j even) or high (j odd) 16 bits of word j // 2.
    Each of the 8 positions must see a uniform 16-bit value: its keep rate
    matches at thresholds spread over the whole range (including the lowest
    and highest values), and the two halves of a word are uncorrelated."""
    for p in (2**-12, 0.0625, 0.25, 0.5, 0.75, 0.9375, 1 - 2**-12):
        bits = draw_bits(device, p=p).reshape(-1, 8)
        q = keep_probability(p)
        for j in range(8):
            assert_within(binomial_z(int(bits[:, j].sum()), len(bits), q), f"position {j} at p={p}")
        if p == 0.5:
            for k in range(4):
                low, high = bits[:, 2 * k].astype(np.float64), bits[:, 2 * k + 1].astype(np.float64)
                r = np.corrcoef(low, high)[0, 1]
                assert_within(r * math.sqrt(len(bits)), f"halves of word {k}")


def test_each_check_catches_flawed_bits():
    rng = np.random.default_rng(0)
    good = (rng.random(1 << 22) < 0.5).astype(np.uint8)
    check_serial_correlation(good)
    check_lanes(good, 0.5)
    check_byte_windows(good, 0.5)
    check_runs(good)

    repeats = np.tile(good[: 1 << 12], 1 << 10)  # a stream that repeats every 4096 bits
    with pytest.raises(AssertionError, match="lag 4096"):
        check_serial_correlation(repeats, lags=(4096,))
    lane = good.copy()
    lane[5::8] = rng.random(len(lane[5::8])) < 0.49  # one lane of eight kept 1% less often
    with pytest.raises(AssertionError, match="lane bias mod"):
        check_lanes(lane, 0.5)
    coarse = good.reshape(-1, 8).copy()
    coarse[:, 1] = coarse[:, 0]  # two bits of each byte from one draw
    with pytest.raises(AssertionError, match="8-bit windows"):
        check_byte_windows(coarse.reshape(-1), 0.5)
    sticky = np.repeat(good[: len(good) // 2], 2)  # every bit drawn twice in a row
    with pytest.raises(AssertionError, match="number of runs"):
        check_runs(sticky)
