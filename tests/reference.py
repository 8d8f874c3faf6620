"""Pure NumPy / pure-torch references the tests compare the kernels against.

``keep_bits`` is an independent implementation of the random mapping the
docs/random-mapping.md documents (Philox4x32-10, counter = (g, offset | 2^63), 16-bit
uniforms, keep iff u >= round(p * 2^16)); the C++ header philox.h is the
other. The masks the kernels return must match it bit for bit.
"""

import numpy as np
import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
STREAM_TAG = 0x80000000
MASK32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """Philox4x32-10 on arrays: ``ctr`` is 4 uint32 arrays, ``key`` 2 ints."""
    c = [np.asarray(w, dtype=np.uint64) for w in ctr]
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for _ in range(10):
        p0 = np.uint64(PHILOX_M0) * c[0]
        p1 = np.uint64(PHILOX_M1) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & np.uint64(MASK32)
        hi1, lo1 = p1 >> np.uint64(32), p1 & np.uint64(MASK32)
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return [w.astype(np.uint32) for w in c]


def uniforms16(seed: int, offset: int, units: int, first_group: int = 0) -> np.ndarray:
    """The 16-bit uniforms of ``units`` units from unit 8 * first_group on."""
    groups = np.arange(first_group, first_group + (units + 7) // 8, dtype=np.uint64)
    seed &= (1 << 64) - 1
    ctr = [
        groups & np.uint64(MASK32),
        groups >> np.uint64(32),
        np.full_like(groups, offset & MASK32),
        np.full_like(groups, (offset >> 32) | STREAM_TAG),
    ]
    words = philox4x32_10(ctr, (seed & MASK32, seed >> 32))
    # Unit 8g + j: low (j even) or high (j odd) half of word j // 2.
    halves = []
    for w in words:
        halves += [w & 0xFFFF, w >> 16]
    return np.stack(halves, axis=1).reshape(-1)[:units]


def keep_threshold(p: float) -> int:
    # C's llround rounds halves away from zero; p * 65536 >= 0.
    return int(np.floor(p * 65536.0 + 0.5))


def keep_bits(seed: int, offset: int, units: int, p: float, first_group: int = 0) -> np.ndarray:
    return uniforms16(seed, offset, units, first_group) >= keep_threshold(p)


def pack_bits(bits) -> torch.Tensor:
    """Bit i % 8 of byte i // 8 is bits[i]; padding bits are 0."""
    return torch.from_numpy(np.packbits(np.asarray(bits, dtype=bool), bitorder="little"))


def unpack_bits(mask: torch.Tensor, units: int) -> torch.Tensor:
    bits = np.unpackbits(mask.cpu().numpy(), bitorder="little")
    return torch.from_numpy(bits[:units].astype(bool))


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` as they lie in memory (``t`` dense, any strides)."""
    dims = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)), reverse=True)
    return t.permute(dims).reshape(-1)


def element_keep(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool tensor shaped like ``like``: element-wise keep flags from a mask
    whose bits follow the memory order of ``like``."""
    keep = torch.empty_like(like, dtype=torch.bool)  # same strides as a dense `like`
    memory_order(keep).copy_(unpack_bits(mask, like.numel()))
    return keep


def keep_probability(p: float) -> float:
    """The keep probability the threshold gives: p quantized to 2^-16 steps."""
    return 1.0 - keep_threshold(p) / 65536


def keep_scale(p: float) -> float:
    """1 / keep_probability(p), the kept elements' scale (E[y] = x); 0 where
    nothing is kept."""
    q = keep_probability(p)
    return 1.0 / q if q > 0 else 0.0


def dropout_reference(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """keep ? x * keep_scale(p) : 0, computed as the kernels do (float for half types)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.tensor(keep_scale(p), dtype=compute)
    y = torch.where(keep, x.to(compute) * scale, torch.zeros((), dtype=compute))
    return y.to(x.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_dtype(*operands) -> torch.dtype:
    """eager's dtype for residual + dropout(x [+ bias]): the operands' promotion."""
    dtype = operands[0].dtype
    for t in operands[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def masked_reference(x, keep, scale, residual=None, bias=None):
    """The kernels' epilogue in pure torch: keep ? r + (x [+ b]) * s : r
    (r = 0 without a residual), in the compute dtype, rounded once to the
    operands' result dtype (mixed dtypes promote, as in eager)."""
    out = result_dtype(x, bias, residual)
    c = compute_dtype(out)
    s = torch.tensor(scale, dtype=c)
    value = x.to(c) if bias is None else x.to(c) + bias.to(c)
    r = torch.zeros((), dtype=c, device=x.device) if residual is None else residual.to(c)
    return torch.where(keep, r + value * s, r).to(out)


def sample_keep(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Drop-path keep flags broadcast to ``x``: bit n for sample n."""
    keep = unpack_bits(mask, x.shape[0]).to(x.device)
    return keep.view((-1,) + (1,) * (x.dim() - 1)).expand(x.shape)


def channel_keep(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Channel-dropout keep flags broadcast to ``x``: bit n * C + c for (n, c)."""
    n, c = x.shape[:2]
    keep = unpack_bits(mask, n * c).to(x.device).view(n, c)
    return keep.view((n, c) + (1,) * (x.dim() - 2)).expand(x.shape)


def keep_bits_at(seed: int, offset: int, units, p: float) -> torch.Tensor:
    """The keep flags of the given unit numbers (any int64 values, in any
    order): each unit's group drawn alone, so units far into a stream cost no
    more than near ones."""
    units = np.asarray(units, dtype=np.int64).reshape(-1)
    groups, index = np.unique(units // 8, return_inverse=True)
    flags = np.zeros(len(units), dtype=bool)
    for g in range(len(groups)):  # one Philox evaluation per distinct group
        words = uniforms16(seed, offset, 8, first_group=int(groups[g]))
        mine = index == g
        flags[mine] = words[units[mine] % 8] >= keep_threshold(p)
    return torch.from_numpy(flags)


def unit_numbers(unit: str, like: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """The number (docs/semantics.md) of the unit each element of ``like`` (the
    op's output) belongs to, as an int64 tensor shaped like it: elements in
    the memory order of empty_like(like) (like's own if dense, else its
    suggested memory format; row-major with a bias: ``rows``), samples by
    their index along dim 0, channels by n * C + c."""
    shape = like.shape
    if unit == "sample":
        return torch.arange(shape[0]).view((-1,) + (1,) * (len(shape) - 1)).expand(shape)
    if unit == "channel":
        n, c = shape[:2]
        return torch.arange(n * c).view((n, c) + (1,) * (len(shape) - 2)).expand(shape)
    if rows:
        return torch.arange(like.numel()).view(shape)
    numbers = torch.empty_like(like, dtype=torch.int64, device="cpu")  # like's layout: its own, or suggested
    memory_order(numbers).copy_(torch.arange(like.numel()))
    return numbers


def in_larger_call(numbers: torch.Tensor, shard) -> torch.Tensor:
    """Unit numbers of a shard's call as the larger call numbers them."""
    if shard is None:
        return numbers
    first, run, stride = shard
    return first + torch.div(numbers, run, rounding_mode="floor") * stride + numbers % run


# --- the norm family (csrc/norm/row_order.h), in NumPy --------------------
#
# An independent implementation of the documented order of the norm ops'
# sums, in float32 (NumPy's float32 adds, multiplies, divides and sqrt are
# IEEE, each rounded once), so that their statistics, outputs and gradients
# can be checked bit for bit.


def norm_threads_per_row(hidden: int) -> int:
    groups = (hidden + 7) // 8
    wanted, t = (groups + 3) // 4, 1
    while t < wanted and t < 256:
        t *= 2
    return t


def norm_row_sums(v: np.ndarray) -> np.ndarray:
    """Each row's sum in row_order.h's order: lanes l < L = 8T add the
    elements l, l + L, ... in turn; each thread's 8 lanes fold as
    (a0 + a4) + (a2 + a6), (a1 + a5) + (a3 + a7); threads halve."""
    rows, hidden = v.shape
    threads = norm_threads_per_row(hidden)
    lanes = 8 * threads
    acc = np.zeros((rows, lanes), dtype=v.dtype)
    for base in range(0, hidden, lanes):
        part = v[:, base:base + lanes]
        acc[:, : part.shape[1]] = acc[:, : part.shape[1]] + part
    a = acc.reshape(rows, threads, 8)
    p = ((a[..., 0] + a[..., 4]) + (a[..., 2] + a[..., 6])) + ((a[..., 1] + a[..., 5]) + (a[..., 3] + a[..., 7]))
    h = threads // 2
    while h >= 1:
        p[:, :h] = p[:, :h] + p[:, h:2 * h]
        h //= 2
    return p[:, 0].copy()


def norm_column_plan(rows: int, hidden: int):
    """(lanes, chunk_rows, chunks) of row_order.h's norm_column_plan."""
    lanes = 256 // norm_threads_per_row(hidden)
    wanted = (rows + lanes * 4 - 1) // (lanes * 4)
    chunks = max(1, min(wanted, (1 << 20) // hidden))
    chunk_rows = ((rows + chunks - 1) // chunks + lanes - 1) // lanes * lanes
    return lanes, chunk_rows, (rows + chunk_rows - 1) // chunk_rows


def norm_column_sums(terms: np.ndarray) -> np.ndarray:
    """Column sums in column_sums.h's order with norm_column_plan's plan:
    chunks in order, of lanes in order, of the chunk's rows r with
    r % lanes == l in order, each fold from +0."""
    rows, hidden = terms.shape
    lanes, chunk_rows, chunks = norm_column_plan(rows, hidden)
    total = np.zeros(hidden, dtype=terms.dtype)
    for k in range(chunks):
        lane_sums = np.zeros((lanes, hidden), dtype=terms.dtype)
        for r in range(k * chunk_rows, min(rows, (k + 1) * chunk_rows)):
            lane_sums[r % lanes] = lane_sums[r % lanes] + terms[r]
        chunk = np.zeros(hidden, dtype=terms.dtype)
        for lane in range(lanes):
            chunk = chunk + lane_sums[lane]
        total = total + chunk
    return total


def norm_inverse_sqrt(x: np.ndarray) -> np.ndarray:
    """row_math.h's inverse_sqrt in float64: the bit-level estimate, then four
    Newton steps y *= 1.5 - (x / 2) y^2, each operation rounded once."""
    x = np.asarray(x, dtype=np.float64)
    half = x * 0.5
    y = (np.uint64(0x5FE6EB50C7B537A9) - (x.view(np.uint64) >> np.uint64(1))).view(np.float64)
    for _ in range(4):
        y = y * (1.5 - (half * y) * y)
    return np.where(x == 0, np.inf, np.where(x == np.inf, 0.0, np.where(x > 0, y, np.nan)))


def norm_forward_in_order(s: np.ndarray, weight, bias, eps: float, rms: bool):
    """(output, mean, rstd) of rows s (float32, the residual stream), in the
    kernels' order and rounding: mean = sum * (1 / H), var = sum((s - mean)^2)
    * (1 / H), rstd = inverse_sqrt(var + eps), output = (s - mean) * rstd *
    weight + bias."""
    f = np.float32
    hidden = s.shape[1]
    inverse = f(1.0 / hidden)
    mean = np.zeros(s.shape[0], dtype=f) if rms else norm_row_sums(s) * inverse
    d = s - mean[:, None]
    var = norm_row_sums(d * d) * inverse
    rstd = norm_inverse_sqrt(var + f(eps)).astype(f)
    z = (s - mean[:, None]) * rstd[:, None]
    return z * weight + bias, mean, rstd


def norm_backward_in_order(dy, s, mean, rstd, weight, keep, scale: float, rms: bool):
    """(grad_residual, grad_input, grad_weight, grad_bias, grad_input_bias)
    in the kernels' order and rounding (float32 arrays; keep a bool array)."""
    f = np.float32
    inverse = f(1.0 / s.shape[1])
    z = (s - mean[:, None]) * rstd[:, None]
    dz = dy * weight
    a = np.zeros(s.shape[0], dtype=f) if rms else norm_row_sums(dz) * inverse
    b = norm_row_sums(dz * z) * inverse
    ds = rstd[:, None] * ((dz - a[:, None]) - z * b[:, None])
    dx = np.where(keep, ds * f(scale), f(0))
    return ds, dx, norm_column_sums(dy * z), norm_column_sums(dy), norm_column_sums(dx)
