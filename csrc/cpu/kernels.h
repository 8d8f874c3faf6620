// The CPU kernel family: one pass over a range of element groups, and the
// bias gradient's column sums (column_sums.h).
//
// kernels_{baseline,avx2,avx512}.cpp each include this file once, after
// `#pragma GCC target(...)` and with REGDROP_CPU_ISA naming a namespace, so
// every copy is compiled for its own instruction set and no copy can be linked
// in place of another (everything but the entry points has internal linkage).
// dropout_cpu.cpp picks a copy at run time.
//
// Work is done per group of 8 elements, which shares one mask byte. For each
// block of up to kBlockGroups groups:
//   1. fill the block's mask bytes: drawn from Philox with one group per
//      vector lane (4, 8 or 16 lanes), read from mask_in, or expanded from
//      the bits of the elements' units;
//   2. apply the epilogue to the block's elements, a group at a time, from the bytes.
// The bytes stay in L1 between the two steps: the tensor is read and written
// once, and the mask is written once (or not at all in low-memory mode).
//
// Requires, included before the pragma: <algorithm>, <cstring>, <limits>,
// <immintrin.h> (on x86), "../column_sums.h", "../epilogue.h", "../philox.h".

#if !defined(REGDROP_CPU_ISA)
#error "define REGDROP_CPU_ISA before including kernels.h"
#endif

namespace regdrop::cpu::REGDROP_CPU_ISA {
namespace {

// Vectors are kept at the native width: GCC lowers wider vectors' compares
// and selects to scalar code.
#if defined(REGDROP_ISA_AVX512)
constexpr int kVectorBytes = 64;
#elif defined(REGDROP_ISA_AVX2)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif
constexpr int kLanes = kVectorBytes / 4;  // Philox evaluations per vector
constexpr int64_t kBlockGroups = 512;

typedef uint32_t u32xL __attribute__((vector_size(kVectorBytes)));
typedef int32_t i32xL __attribute__((vector_size(kVectorBytes)));
typedef uint8_t u8xL __attribute__((vector_size(kLanes)));

// ---------------------------------------------------------------- Philox xL

// hi:lo = a * m per lane. Plain vector code would multiply in 64 bits;
// pmuludq on the even and the odd lanes gives two 32x32->64 products per
// 64-bit lane.
inline void mulhilo(u32xL a, uint32_t m, u32xL& hi, u32xL& lo) {
#if defined(REGDROP_ISA_AVX512)
  const __m512i va = reinterpret_cast<__m512i>(a);
  const __m512i vm = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i even = _mm512_mul_epu32(va, vm);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(va, 32), vm);
  hi = reinterpret_cast<u32xL>(_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd));
  lo = reinterpret_cast<u32xL>(_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32)));
#elif defined(REGDROP_ISA_AVX2)
  const __m256i va = reinterpret_cast<__m256i>(a);
  const __m256i vm = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32(va, vm);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(va, 32), vm);
  hi = reinterpret_cast<u32xL>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
  lo = reinterpret_cast<u32xL>(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));
#elif defined(__x86_64__)
  const __m128i va = reinterpret_cast<__m128i>(a);
  const __m128i vm = _mm_set1_epi32(static_cast<int>(m));
  const __m128i even = _mm_mul_epu32(va, vm);
  const __m128i odd = _mm_mul_epu32(_mm_srli_epi64(va, 32), vm);
  const __m128i low_halves = _mm_set1_epi64x(0xFFFFFFFF);
  hi = reinterpret_cast<u32xL>(_mm_or_si128(_mm_srli_epi64(even, 32), _mm_andnot_si128(low_halves, odd)));
  lo = reinterpret_cast<u32xL>(_mm_or_si128(_mm_and_si128(even, low_halves), _mm_slli_epi64(odd, 32)));
#else
  for (int i = 0; i < kLanes; ++i) {
    uint32_t h, l;
    philox_mulhilo(a[i], m, h, l);
    hi[i] = h;
    lo[i] = l;
  }
#endif
}

// The mask bytes of groups g0 .. g0 + kLanes - 1: the vector form of
// group_keep_bits() in philox.h, lane i computing group g0 + i.
inline u8xL draw_bytes_vector(uint64_t seed, uint64_t offset, uint64_t g0, uint32_t threshold) {
  u32xL lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = static_cast<uint32_t>(i);
  const PhiloxBlock base = group_counter(g0, offset);
  u32xL c0 = base.w[0] + lane;
  // A lane whose low word wrapped carries into the high word (-1 where true).
  u32xL c1 = base.w[1] - reinterpret_cast<u32xL>(c0 < base.w[0]);
  u32xL c2 = u32xL{} + base.w[2];
  u32xL c3 = u32xL{} + base.w[3];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    u32xL hi0, lo0, hi1, lo1;
    mulhilo(c0, kPhiloxM0, hi0, lo0);
    mulhilo(c2, kPhiloxM1, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Uniforms are below 2^16 and the threshold at most 2^16: a signed compare
  // is exact and cheaper than an unsigned one.
  const int32_t t = static_cast<int32_t>(threshold);
  const u32xL words[4] = {c0, c1, c2, c3};
  i32xL bits{};
  for (int k = 0; k < 4; ++k) {
    const i32xL low = reinterpret_cast<i32xL>(words[k] & 0xFFFFu);
    const i32xL high = reinterpret_cast<i32xL>(words[k] >> 16);
    bits |= (low >= t) & (1 << (2 * k));
    bits |= (high >= t) & (1 << (2 * k + 1));
  }
  return __builtin_convertvector(bits, u8xL);
}

inline void draw_bytes(uint64_t seed, uint64_t offset, uint32_t threshold, int64_t g0, int64_t count,
                       uint8_t* bytes) {
  for (int64_t i = 0; i < count; i += kLanes) {
    const u8xL b = draw_bytes_vector(seed, offset, static_cast<uint64_t>(g0 + i), threshold);
    std::memcpy(bytes + i, &b, static_cast<size_t>(std::min<int64_t>(kLanes, count - i)));
  }
}

// Bits [from, from + n) of `src` into bits [at, at + n) of `dst`, which are 0.
inline void or_bits(const uint8_t* src, int64_t from, uint8_t* dst, int64_t at, int64_t n) {
  auto bit = [&](int64_t i) { return (src[i >> 3] >> (i & 7)) & 1u; };
  for (; n > 0 && (at & 7) != 0; ++from, ++at, --n) dst[at >> 3] |= bit(from) << (at & 7);
  const int shift = static_cast<int>(from & 7);
  for (; n >= 8; from += 8, at += 8, n -= 8) {
    const uint8_t* s = src + (from >> 3);
    dst[at >> 3] = static_cast<uint8_t>(shift == 0 ? s[0] : (s[0] | s[1] << 8) >> shift);
  }
  for (; n > 0; ++from, ++at, --n) dst[at >> 3] |= bit(from) << (at & 7);
}

// The mask bytes of groups [g0, g0 + count) of a call that is a shard of a
// larger one (kernel_call.h's ShardMap): each stretch of its units that lies
// in one run is drawn where the larger call draws it, then shifted into place.
inline void draw_shard_bytes(const KernelCall& c, uint64_t seed, uint64_t offset, int64_t g0, int64_t count,
                             uint8_t* bytes) {
  std::memset(bytes, 0, static_cast<size_t>(count));
  const ShardMap& m = c.shard;
  uint8_t drawn[kBlockGroups + 1];  // a stretch of up to count groups spans one more
  const int64_t begin = g0 * kUnitsPerGroup;
  const int64_t end = std::min(c.numel, (g0 + count) * kUnitsPerGroup);
  for (int64_t e = begin; e < end;) {
    const int64_t pos = e % m.run;
    const int64_t len = std::min(m.run - pos, end - e);
    const int64_t unit = m.first + e / m.run * m.stride + pos;
    const int64_t skip = unit % kUnitsPerGroup;
    draw_bytes(seed, offset, c.threshold, unit / kUnitsPerGroup, (skip + len + kUnitsPerGroup - 1) / kUnitsPerGroup,
               drawn);
    or_bits(drawn, skip, bytes, e - begin, len);
    e += len;
  }
}

// ------------------------------------------------------ unit bits -> bytes

inline bool bit_at(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

inline void set_bit_range(uint8_t* bytes, int64_t first, int64_t count) {
  for (; count > 0 && (first & 7) != 0; ++first, --count) bytes[first >> 3] |= 1u << (first & 7);
  std::memset(bytes + (first >> 3), 0xFF, static_cast<size_t>(count >> 3));
  first += count & ~int64_t{7};
  for (count &= 7; count > 0; ++first, --count) bytes[first >> 3] |= 1u << (first & 7);
}

// The bytes of groups [g0, g0 + count) when each element takes its unit's bit.
inline void unit_bytes(const KernelCall& c, int64_t g0, int64_t count, uint8_t* bytes) {
  std::memset(bytes, 0, static_cast<size_t>(count));
  const UnitLayout& u = c.units;
  const int64_t first = g0 * kUnitsPerGroup;
  const int64_t end = std::min(c.numel, (g0 + count) * kUnitsPerGroup);
  for (int64_t e = first; e < end;) {
    if (u.inner == 1) {
      // Channels-last: a row of `channels` elements takes consecutive unit bits.
      const int64_t channel = e % u.channels;
      const int64_t len = std::min(u.channels - channel, end - e);
      const int64_t unit = (e / u.block) * u.channels + channel;
      for (int64_t k = 0; k < len; ++k) {
        if (bit_at(c.mask_in, unit + k)) bytes[(e - first + k) >> 3] |= 1u << ((e - first + k) & 7);
      }
      e += len;
    } else {
      // A run of `inner` elements shares one unit.
      const int64_t len = std::min(u.inner - e % u.inner, end - e);
      const int64_t unit = (e / u.block) * u.channels + (e / u.inner) % u.channels;
      if (bit_at(c.mask_in, unit)) set_bit_range(bytes, e - first, len);
      e += len;
    }
  }
}

// ------------------------------------------------- 8 elements at a time

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Elements are processed a chunk at a time: kParts native vectors of kWidth
// lanes of the compute type (half types compute in float), which together
// cover kGroups whole groups. AVX-512: 16 floats, two groups, or 8 doubles;
// AVX2: 8 floats or 2 x 4 doubles; baseline: 2 x 4 floats or 4 x 2 doubles.
// The vector types are spelled out, not computed in a template: GCC drops
// vector_size from dependent types.
constexpr int kFloatWidth = kVectorBytes / 4;
constexpr int kDoubleWidth = kVectorBytes / 8;
typedef float f32xW __attribute__((vector_size(kFloatWidth * 4)));
typedef int32_t i32xW __attribute__((vector_size(kFloatWidth * 4)));
typedef uint32_t u32xW __attribute__((vector_size(kFloatWidth * 4)));
typedef uint16_t u16xW __attribute__((vector_size(kFloatWidth * 2)));
typedef int16_t i16xW __attribute__((vector_size(kFloatWidth * 2)));
typedef double f64xW __attribute__((vector_size(kDoubleWidth * 8)));
typedef int64_t i64xW __attribute__((vector_size(kDoubleWidth * 8)));

template <class T>
struct LaneTypes {  // float, Half, BFloat16
  using C = float;
  using I = int32_t;
  using V = f32xW;
  using Keep = i32xW;
  static constexpr int kWidth = kFloatWidth;
};
template <>
struct LaneTypes<double> {
  using C = double;
  using I = int64_t;
  using V = f64xW;
  using Keep = i64xW;
  static constexpr int kWidth = kDoubleWidth;
};

template <class T>
struct Lanes : LaneTypes<T> {
  using typename LaneTypes<T>::C;
  using typename LaneTypes<T>::I;
  using typename LaneTypes<T>::V;
  using typename LaneTypes<T>::Keep;
  using LaneTypes<T>::kWidth;
  static constexpr int kChunk = std::max(kWidth, kUnitsPerGroup);  // elements
  static constexpr int kGroups = kChunk / kUnitsPerGroup;
  static constexpr int kParts = kChunk / kWidth;

  static V load(const T* p) {
    if constexpr (std::is_same_v<T, BFloat16>) {
      u16xW h;
      std::memcpy(&h, p, sizeof(h));
      return reinterpret_cast<f32xW>(__builtin_convertvector(h, u32xW) << 16);
    } else if constexpr (std::is_same_v<T, Half>) {
#if defined(REGDROP_ISA_AVX512)
      return reinterpret_cast<V>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(REGDROP_ISA_AVX2)
      return reinterpret_cast<V>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
      typedef _Float16 f16xW __attribute__((vector_size(kFloatWidth * 2)));
      f16xW h;
      std::memcpy(&h, p, sizeof(h));
      return __builtin_convertvector(h, f32xW);
#endif
    } else {
      V v;
      std::memcpy(&v, p, sizeof(v));
      return v;
    }
  }

  static void store(T* p, V v) {
    if constexpr (std::is_same_v<T, BFloat16>) {
      // Round to nearest even; any NaN becomes the canonical 0x7FFF.
      const u32xW u = reinterpret_cast<u32xW>(v);
      const u32xW rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
      const u32xW is_nan = reinterpret_cast<u32xW>((u & 0x7FFFFFFFu) > 0x7F800000u);
      const u16xW h = __builtin_convertvector((rounded & ~is_nan) | (is_nan & 0x7FFFu), u16xW);
      std::memcpy(p, &h, sizeof(h));
    } else if constexpr (std::is_same_v<T, Half>) {
      u16xW h;
#if defined(REGDROP_ISA_AVX512)
      h = reinterpret_cast<u16xW>(_mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT));
#elif defined(REGDROP_ISA_AVX2)
      h = reinterpret_cast<u16xW>(_mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
#else
      typedef _Float16 f16xW __attribute__((vector_size(kFloatWidth * 2)));
      h = reinterpret_cast<u16xW>(__builtin_convertvector(v, f16xW));
#endif
      // The conversion keeps NaN payloads; any NaN becomes the canonical 0x7FFF.
      const u16xW is_nan = __builtin_convertvector(v != v, i16xW) != 0;
      h = (h & ~is_nan) | (is_nan & 0x7FFFu);
      std::memcpy(p, &h, sizeof(h));
    } else {
      std::memcpy(p, &v, sizeof(v));
    }
  }

  // All lanes -1 where bit j of `bits` is set, for lane j.
  static Keep keep_mask(uint32_t bits) {
    Keep select;
    for (int j = 0; j < kWidth; ++j) select[j] = I{1} << j;
    return ((Keep{} + static_cast<I>(bits)) & select) != 0;
  }

  static V blend(Keep keep, V kept, V dropped) {
    return reinterpret_cast<V>((reinterpret_cast<Keep>(kept) & keep) |
                               (reinterpret_cast<Keep>(dropped) & ~keep));
  }

  // A kept value, with any NaN written as the canonical NaN (README,
  // "Semantics"; the CUDA kernels do the same). The 16-bit types get it
  // from store(); float and double here.
  static V kept_canonical(V v) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const Keep is_nan = v != v;
      const Keep canonical = Keep{} + static_cast<I>(std::numeric_limits<std::make_unsigned_t<I>>::max() >> 1);
      return reinterpret_cast<V>((reinterpret_cast<Keep>(v) & ~is_nan) | (canonical & is_nan));
    } else {
      return v;
    }
  }
};

// The epilogue of one chunk. kWholeUnits: chunks are mostly all-kept or
// all-dropped (unit masks), worth a branch that skips the select, or the input.
template <class O, Epilogue E, bool kWholeUnits>
struct Apply {
  using T = typename O::InT;
  using R = typename O::ResidualT;
  using B = typename O::BiasT;
  using Y = typename O::OutT;
  using L = Lanes<T>;
  using V = typename L::V;
  static constexpr int kChunk = L::kChunk;
  static constexpr uint32_t kAllKept = (uint64_t{1} << kChunk) - 1;
  const T* in;
  const R* residual;
  const B* bias;
  Y* out;
  int64_t bias_len;
  V scale;

  // Elements e .. e + kChunk - 1 (all inside the tensor), with their keep
  // bits (bit j for element e + j) and the first one's column.
  inline void chunk(int64_t e, uint32_t bits, int64_t col) const {
    lanes(in + e, E == Epilogue::Scale ? nullptr : residual + e, out + e, bits, col);
  }

  // The last n < kChunk elements go through the same code via stack copies.
  inline void partial_chunk(int64_t e, int64_t n, uint32_t bits, int64_t col) const {
    T x[kChunk] = {};
    R r[kChunk] = {};
    Y y[kChunk];
    std::memcpy(x, in + e, sizeof(T) * n);
    if (E != Epilogue::Scale) std::memcpy(r, residual + e, sizeof(R) * n);
    lanes(x, r, y, bits & ((uint32_t{1} << n) - 1), col);
    std::memcpy(out + e, y, sizeof(Y) * n);
  }

  inline void lanes(const T* x, const R* r, Y* y, uint32_t bits, int64_t col) const {
    if constexpr (kWholeUnits && E != Epilogue::AddBiasResidual) {
      if (bits == 0) {  // dropped: the input is not even read
        for (int q = 0; q < L::kParts; ++q) {
          const int first = q * L::kWidth;
          V dropped{};
          if constexpr (E != Epilogue::Scale) dropped = Lanes<R>::load(r + first);
          if constexpr (!std::is_same_v<R, Y>) dropped = Lanes<Y>::kept_canonical(dropped);
          Lanes<Y>::store(y + first, dropped);
        }
        return;
      }
    }
    // Bias values by column; a row whose width is a multiple of the chunk
    // never wraps inside one.
    const bool wraps = col + kChunk > bias_len;
    B bias_lanes[kChunk];
    if (E == Epilogue::AddBiasResidual && wraps) {
      for (int j = 0; j < kChunk; ++j) bias_lanes[j] = bias[(col + j) % bias_len];
    }
    for (int q = 0; q < L::kParts; ++q) {
      const int first = q * L::kWidth;
      V rv{}, bv{};
      if constexpr (E != Epilogue::Scale) rv = Lanes<R>::load(r + first);
      if constexpr (E == Epilogue::AddBiasResidual) {
        bv = Lanes<B>::load(wraps ? bias_lanes + first : bias + col + first);
      }
      const V kept = Lanes<Y>::kept_canonical(kept_value<E>(L::load(x + first), rv, bv, scale));
      // A residual widened to the output's type is a new value: its NaNs canonical too.
      const V dropped = std::is_same_v<R, Y> ? dropped_value<E>(rv) : Lanes<Y>::kept_canonical(dropped_value<E>(rv));
      const V result = kWholeUnits && bits == kAllKept ? kept : L::blend(L::keep_mask(bits >> first), kept, dropped);
      Lanes<Y>::store(y + first, result);
    }
  }
};

template <class O, Epilogue E, MaskSource S>
void run_groups_typed(const KernelCall& c, int64_t g_begin, int64_t g_end) {
  using T = typename O::InT;
  using C = typename Lanes<T>::C;
  const Apply<O, E, S == MaskSource::Units> apply{static_cast<const T*>(c.in),
                                                  static_cast<const typename O::ResidualT*>(c.residual),
                                                  static_cast<const typename O::BiasT*>(c.bias),
                                                  static_cast<typename O::OutT*>(c.out),
                                                  c.bias_len,
                                                  typename Lanes<T>::V{} + static_cast<C>(c.scale)};
  uint64_t seed = 0, offset = 0;
  if constexpr (S == MaskSource::Draw) {
    c.rng.unpack(seed, offset);
  }
  const int64_t full_groups = c.numel / kUnitsPerGroup;
  const int64_t tail = c.numel % kUnitsPerGroup;
  // Only bias reads need each group's column.
  constexpr bool tracks_columns = E == Epilogue::AddBiasResidual;
  int64_t col = tracks_columns ? (g_begin * kUnitsPerGroup) % c.bias_len : 0;
  uint8_t local[kBlockGroups];

  for (int64_t g0 = g_begin; g0 < g_end; g0 += kBlockGroups) {
    const int64_t count = std::min(kBlockGroups, g_end - g0);
    const uint8_t* bytes;
    if constexpr (S == MaskSource::Draw) {
      uint8_t* dst = c.mask_out != nullptr ? c.mask_out + g0 : local;
      if (c.shard.sharded()) {
        draw_shard_bytes(c, seed, offset, g0, count, dst);  // padding bits stay 0
      } else {
        draw_bytes(seed, offset, c.threshold, g0, count, dst);
        if (tail != 0 && g0 + count > full_groups) dst[count - 1] &= (1u << tail) - 1;  // padding bits are 0
      }
      bytes = dst;
    } else if constexpr (S == MaskSource::Elements) {
      bytes = c.mask_in + g0;
    } else {
      unit_bytes(c, g0, count, local);
      bytes = local;
    }
    if (c.out == nullptr) continue;  // only the mask was asked for
    constexpr int kGroups = Lanes<T>::kGroups;
    for (int64_t i = 0; i < count; i += kGroups) {
      const int64_t e = (g0 + i) * kUnitsPerGroup;
      const int64_t n = std::min(std::min<int64_t>(kGroups, count - i) * kUnitsPerGroup, c.numel - e);
      uint32_t bits = bytes[i];
      if constexpr (kGroups == 2) {
        if (i + 1 < count) bits |= uint32_t{bytes[i + 1]} << kUnitsPerGroup;
      }
      if (n == Lanes<T>::kChunk) {
        apply.chunk(e, bits, col);
      } else {
        apply.partial_chunk(e, n, bits, col);
      }
      if constexpr (tracks_columns) {
        col += n;
        while (col >= c.bias_len) col -= c.bias_len;
      }
    }
  }
}

template <class O, Epilogue E>
void run_groups_with_source(const KernelCall& c, int64_t g_begin, int64_t g_end) {
  switch (c.source) {
    case MaskSource::Draw:
      return run_groups_typed<O, E, MaskSource::Draw>(c, g_begin, g_end);
    case MaskSource::Elements:
      return run_groups_typed<O, E, MaskSource::Elements>(c, g_begin, g_end);
    case MaskSource::Units:
      return run_groups_typed<O, E, MaskSource::Units>(c, g_begin, g_end);
  }
}

template <class T>
void run_groups_for_dtype(const KernelCall& c, int64_t g_begin, int64_t g_end) {
  switch (c.epilogue) {
    case Epilogue::Scale:
      return run_groups_with_source<OperandTypes<T>, Epilogue::Scale>(c, g_begin, g_end);
    case Epilogue::AddResidual:
      return run_groups_with_source<OperandTypes<T>, Epilogue::AddResidual>(c, g_begin, g_end);
    case Epilogue::AddBiasResidual:
      return run_groups_with_source<OperandTypes<T>, Epilogue::AddBiasResidual>(c, g_begin, g_end);
  }
}

// The widening mix (kernel_call.h): a 16-bit input T, a float32 output, and a
// residual (and bias) of T or float32; only the residual forms have it.
template <class T>
void run_groups_widening(const KernelCall& c, int64_t g_begin, int64_t g_end) {
  const bool float_residual = c.residual_dtype == ScalarKind::Float;
  const bool float_bias = c.bias_dtype == ScalarKind::Float;
  if (c.epilogue == Epilogue::AddResidual) {
    return run_groups_with_source<OperandTypes<T, float, T, float>, Epilogue::AddResidual>(c, g_begin, g_end);
  }
  if (float_residual && float_bias) {
    return run_groups_with_source<OperandTypes<T, float, float, float>, Epilogue::AddBiasResidual>(c, g_begin, g_end);
  }
  if (float_residual) {
    return run_groups_with_source<OperandTypes<T, float, T, float>, Epilogue::AddBiasResidual>(c, g_begin, g_end);
  }
  return run_groups_with_source<OperandTypes<T, T, float, float>, Epilogue::AddBiasResidual>(c, g_begin, g_end);
}

// ------------------------------------------------------ bias gradients

// The keep bits of elements e .. e + n - 1 (n <= 16), at any bit offset.
inline uint32_t bits_at(const uint8_t* mask, int64_t e, int n) {
  uint32_t window = 0;
  std::memcpy(&window, mask + (e >> 3), static_cast<size_t>(((e & 7) + n + 7) >> 3));
  return (window >> (e & 7)) & ((uint32_t{1} << n) - 1);
}

// v rounded to T (round to nearest even, canonical NaN), as store() rounds.
template <class T>
inline void store_one(T* p, typename Lanes<T>::C v) {
  T lanes[Lanes<T>::kWidth];
  Lanes<T>::store(lanes, Lanes<T>::kept_canonical(typename Lanes<T>::V{} + v));
  *p = lanes[0];
}

// One (chunk, tile) of a bias gradient (column_sums.h): grad_input = keep ?
// grad * s : 0 over the chunk's rows and the tile's columns, its lane sums
// in row order, folded in lane order into `target`: the chunk's row of
// accumulators, or, with one chunk, the T result.
template <class T>
void column_sums_typed(const KernelCall& c, const ColumnSumPlan& plan, int64_t task, void* target) {
  using L = Lanes<T>;
  using C = typename L::C;
  using V = typename L::V;
  constexpr int kChunk = L::kChunk;
  const int64_t chunk = task / plan.tiles, tile = task % plan.tiles;
  const int64_t width = int64_t{kUnitsPerGroup} * plan.column_groups;
  const int64_t col0 = tile * width, cols = std::min(plan.cols - col0, width);
  const int64_t begin = chunk * plan.chunk_rows, end = std::min(plan.rows, begin + plan.chunk_rows);
  const T* grad = static_cast<const T*>(c.in);
  T* out = static_cast<T*>(c.out);
  const V scale = V{} + static_cast<C>(c.scale);
  // At most lanes x cols <= 8 x kColumnSumThreads sums, in rows rounded up
  // to whole vectors, or in one run with a vector of slack.
  alignas(64) C sums[kColumnSumThreads * std::max(kUnitsPerGroup, kChunk) + kChunk];

  // grad_input of elements [e, e + count), added into acc[0, count). Whole
  // vectors: past `count` it adds +0, which changes no sum.
  auto segment = [&](int64_t e, int64_t count, C* acc) {
    for (int64_t k = 0; k < count; k += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, count - k));
      const uint32_t bits = bits_at(c.mask_in, e + k, n);
      T x[kChunk] = {}, y[kChunk];
      const T* src = n == kChunk ? grad + e + k : x;
      T* dst = n == kChunk ? out + e + k : y;
      if (n < kChunk) std::memcpy(x, grad + e + k, sizeof(T) * n);
      for (int q = 0; q < L::kParts; ++q) {
        const int first = q * L::kWidth;
        const V kept = L::kept_canonical(L::load(src + first) * scale);
        const V value = L::blend(L::keep_mask(bits >> first), kept, V{});
        L::store(dst + first, value);
        V sum;
        std::memcpy(&sum, acc + k + first, sizeof(V));
        sum += value;
        std::memcpy(acc + k + first, &sum, sizeof(V));
      }
      if (n < kChunk) std::memcpy(out + e + k, y, sizeof(T) * n);
    }
  };

  // Lane l's sum of column j is sums[l * stride + j].
  int64_t stride;
  if (plan.tiles == 1) {
    // The tile is whole rows: the chunk is one run of memory, and element
    // i of it adds into sums[i % (lanes * cols)], so long runs of elements
    // add into long runs of sums, narrow rows included.
    stride = cols;
    const int64_t period = plan.lanes * cols;
    std::fill(sums, sums + period + kChunk, C(0));
    for (int64_t i = 0, n = (end - begin) * cols; i < n;) {
      const int64_t count = std::min(n - i, period - i % period);
      segment(begin * cols + i, count, sums + i % period);
      i += count;
    }
  } else {
    // A row of sums per lane, whole vectors apart.
    stride = (width + kChunk - 1) / kChunk * kChunk;
    std::fill(sums, sums + plan.lanes * stride, C(0));
    for (int64_t r = begin; r < end; ++r) segment(r * plan.cols + col0, cols, sums + (r - begin) % plan.lanes * stride);
  }
  for (int64_t j = 0; j < cols; ++j) {
    C sum = 0;
    for (uint32_t l = 0; l < plan.lanes; ++l) sum += sums[l * stride + j];
    if (plan.chunks == 1) {
      store_one(static_cast<T*>(target) + col0 + j, sum);
    } else {
      static_cast<C*>(target)[chunk * plan.cols + col0 + j] = sum;
    }
  }
}

// Columns [begin, end) of the result: the chunks' sums added in order.
template <class T>
void fold_chunks_typed(const ColumnSumPlan& plan, const void* partial, void* result, int64_t begin,
                       int64_t end) {
  using C = typename Lanes<T>::C;
  const C* sums = static_cast<const C*>(partial);
  for (int64_t col = begin; col < end; ++col) {
    C sum = 0;
    for (int64_t k = 0; k < plan.chunks; ++k) sum += sums[k * plan.cols + col];
    store_one(static_cast<T*>(result) + col, sum);
  }
}

}  // namespace

// The entry points, one set per instruction set (kernel_isa.h).
void run_groups(const KernelCall& c, int64_t g_begin, int64_t g_end) {
  if (widening(c)) {
    return c.dtype == ScalarKind::Half ? run_groups_widening<Half>(c, g_begin, g_end)
                                       : run_groups_widening<BFloat16>(c, g_begin, g_end);
  }
  switch (c.dtype) {
    case ScalarKind::Float:
      return run_groups_for_dtype<float>(c, g_begin, g_end);
    case ScalarKind::Double:
      return run_groups_for_dtype<double>(c, g_begin, g_end);
    case ScalarKind::Half:
      return run_groups_for_dtype<Half>(c, g_begin, g_end);
    case ScalarKind::BFloat16:
      return run_groups_for_dtype<BFloat16>(c, g_begin, g_end);
  }
}

void column_sums(const KernelCall& c, const ColumnSumPlan& plan, int64_t task, void* target) {
  switch (c.dtype) {
    case ScalarKind::Float:
      return column_sums_typed<float>(c, plan, task, target);
    case ScalarKind::Double:
      return column_sums_typed<double>(c, plan, task, target);
    case ScalarKind::Half:
      return column_sums_typed<Half>(c, plan, task, target);
    case ScalarKind::BFloat16:
      return column_sums_typed<BFloat16>(c, plan, task, target);
  }
}

void fold_chunks(const KernelCall& c, const ColumnSumPlan& plan, const void* partial, int64_t begin,
                 int64_t end) {
  switch (c.dtype) {
    case ScalarKind::Float:
      return fold_chunks_typed<float>(plan, partial, c.bias_grad, begin, end);
    case ScalarKind::Double:
      return fold_chunks_typed<double>(plan, partial, c.bias_grad, begin, end);
    case ScalarKind::Half:
      return fold_chunks_typed<Half>(plan, partial, c.bias_grad, begin, end);
    case ScalarKind::BFloat16:
      return fold_chunks_typed<BFloat16>(plan, partial, c.bias_grad, begin, end);
  }
}

}  // namespace regdrop::cpu::REGDROP_CPU_ISA
