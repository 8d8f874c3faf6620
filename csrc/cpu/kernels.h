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
//      64-bit vector lane (6, 12 or 32 groups a step), read from mask_in, or
//      expanded from the bits of the elements' units;
//   2. apply the epilogue to the block's elements, a chunk of 8 to 32 at a
//      time, from the bytes.
// The bytes stay in L1 between the two steps: the tensor is read and written
// once, and the mask is written once (or not at all in low-memory mode).
// Blocks are small, so that memory streams while the next block's bits are
// drawn. Units of kRunElements or more (samples, most channels) skip the
// bytes: each run of a unit's elements is a scaled copy, or zeros (or the
// residual), the input not even read. Outputs past kStreamBytes are written
// with non-temporal stores where their pages are already in memory
// (stream_output).
//
// Requires, included before the pragma: <algorithm>, <cstring>, <limits>, <stdexcept>,
// <immintrin.h> (on x86), "../column_sums.h", "../epilogue.h", "../philox.h",
// "lane_masks.h".

#if !defined(REGDROP_CPU_ISA)
#error "define REGDROP_CPU_ISA before including kernels.h"
#endif

#include "philox_lanes.h"

namespace regdrop::cpu::REGDROP_CPU_ISA {
namespace {

// Four draws a block (kLanes groups each: philox_lanes.h). A block's draw is
// a few hundred instructions of arithmetic, its epilogue a burst of loads
// and stores: short blocks let out-of-order execution overlap the two, and
// the stores drain while the next bits are drawn (measured at 16M elements,
// one thread, AVX2: fp32 dropout and dropout_add about 12% faster with 48
// groups than with 120).
constexpr int64_t kBlockGroups = 4 * kLanes;

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
inline void draw_shard_bytes(const KernelCall& c, const PhiloxLanes& philox, int64_t g0, int64_t count,
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
    philox.draw_bytes(unit / kUnitsPerGroup, (skip + len + kUnitsPerGroup - 1) / kUnitsPerGroup, drawn);
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

// Outputs at least this large may be written with non-temporal stores: they
// do not fit beside their inputs in the last-level cache (32 MB on the EPYC
// this was measured on, as on most server parts), so a normal store would
// read each line before writing it and evict what is cached, for nothing.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// Whether elements [begin, end) of an output of `numel` elements of
// `element_bytes` at `out` (null: only a mask is drawn) are written with
// non-temporal stores: where the output is large and their pages are
// already in memory (reused from an earlier call, as tcmalloc and jemalloc
// hand it out), judged by the page in the middle of the range (malloc
// itself writes a block's first bytes, and other threads those next to the
// range's ends). A fresh mapping's page (glibc's malloc maps every block
// past 32 MiB anew) is zeroed by the OS at its first touch, through the
// cache, where a plain store then finds its line and a non-temporal one has
// to evict it. Measured at 16M elements (drop-path, channel dropout,
// dropout_add backward): non-temporal stores 20-30% faster into reused
// memory, 3-10% slower into fresh pages, huge pages or not.
// REGDROP_STREAMING_STORES=always or =never overrides the choice (the tests
// check the streamed outputs with it).
enum class Streaming { Auto, Always, Never };

inline Streaming streaming_setting() {
  const char* v = std::getenv("REGDROP_STREAMING_STORES");
  if (v != nullptr && std::strcmp(v, "always") == 0) return Streaming::Always;
  if (v != nullptr && std::strcmp(v, "never") == 0) return Streaming::Never;
  return Streaming::Auto;
}

inline bool stream_output(const void* out, int64_t element_bytes, int64_t begin, int64_t end, int64_t numel) {
  static const Streaming setting = streaming_setting();
  if (out == nullptr || numel * element_bytes < kStreamBytes || setting == Streaming::Never) return false;
#if defined(__linux__)
  if (setting == Streaming::Always) return true;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t middle = reinterpret_cast<uintptr_t>(out) + static_cast<uintptr_t>((begin + end) / 2 * element_bytes);
  unsigned char resident = 0;
  return mincore(reinterpret_cast<void*>(middle & ~(page - 1)), 1, &resident) == 0 && (resident & 1) != 0;
#else
  return true;
#endif
}

// The bytes of w to p: with a non-temporal store where `streaming` and p is
// aligned to them (every whole chunk of an output from an aligned start).
template <class W>
inline void write(void* p, const W& w, bool streaming) {
#if defined(__x86_64__)
  if (streaming && (reinterpret_cast<uintptr_t>(p) & (sizeof(W) - 1)) == 0) {
#if defined(REGDROP_ISA_AVX512)
    if constexpr (sizeof(W) == 64) {
      return _mm512_stream_si512(static_cast<__m512i*>(p), reinterpret_cast<const __m512i&>(w));
    }
#endif
#if defined(REGDROP_ISA_AVX512) || defined(REGDROP_ISA_AVX2)
    if constexpr (sizeof(W) == 32) {
      return _mm256_stream_si256(static_cast<__m256i*>(p), reinterpret_cast<const __m256i&>(w));
    }
#endif
    if constexpr (sizeof(W) == 16) {
      return _mm_stream_si128(static_cast<__m128i*>(p), reinterpret_cast<const __m128i&>(w));
    }
  }
#endif
  std::memcpy(p, &w, sizeof(W));
}

// Makes a call's non-temporal stores visible before it returns: they are
// weakly ordered, even against the lock of the threads' join.
inline void drain_stores() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

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
#if defined(REGDROP_ISA_AVX512)
      return reinterpret_cast<V>(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#elif defined(REGDROP_ISA_AVX2)
      return reinterpret_cast<V>(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
      u16xW h;
      std::memcpy(&h, p, sizeof(h));
      return reinterpret_cast<f32xW>(__builtin_convertvector(h, u32xW) << 16);
#endif
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

  // The low halves of 32-bit lanes whose values fit in 16 bits.
  static u16xW narrow(u32xW u) {
#if defined(REGDROP_ISA_AVX512)
    return reinterpret_cast<u16xW>(_mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(u)));
#elif defined(REGDROP_ISA_AVX2)
    const __m256i w = reinterpret_cast<__m256i>(u);
    return reinterpret_cast<u16xW>(_mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
#else
    return __builtin_convertvector(u, u16xW);
#endif
  }

  static void store(T* p, V v, bool streaming = false) {
    // Round to nearest even; any NaN becomes the canonical 0x7FFF.
    if constexpr (std::is_same_v<T, BFloat16>) {
      const u32xW u = reinterpret_cast<u32xW>(v);
      const u32xW rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
      const i32xW is_nan = v != v;
      write(p, narrow(is_nan ? u32xW{} + 0x7FFFu : rounded), streaming);
    } else if constexpr (std::is_same_v<T, Half>) {
      // The conversion keeps NaN payloads.
#if defined(REGDROP_ISA_AVX512)
      const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
      write(p, _mm256_mask_mov_epi16(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm256_set1_epi16(0x7FFF)), streaming);
#else
      u32xW h;
#if defined(REGDROP_ISA_AVX2)
      h = reinterpret_cast<u32xW>(
          _mm256_cvtepu16_epi32(_mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT)));
#else
      typedef _Float16 f16xW __attribute__((vector_size(kFloatWidth * 2)));
      h = __builtin_convertvector(reinterpret_cast<u16xW>(__builtin_convertvector(v, f16xW)), u32xW);
#endif
      const i32xW is_nan = v != v;
      write(p, narrow(is_nan ? u32xW{} + 0x7FFFu : h), streaming);
#endif
    } else {
      write(p, v, streaming);
    }
  }

  // Lane j: `kept` where bit j of `bits` is set, else `dropped`. AVX-512
  // takes the bits as a mask register; other sets look the lane mask up
  // (lane_masks.h).
  static V select(uint32_t bits, V kept, V dropped) {
#if defined(REGDROP_ISA_AVX512)
    if constexpr (std::is_same_v<C, float>) {
      return reinterpret_cast<V>(_mm512_mask_blend_ps(static_cast<__mmask16>(bits), reinterpret_cast<__m512>(dropped),
                                                      reinterpret_cast<__m512>(kept)));
    } else {
      return reinterpret_cast<V>(_mm512_mask_blend_pd(static_cast<__mmask8>(bits), reinterpret_cast<__m512d>(dropped),
                                                      reinterpret_cast<__m512d>(kept)));
    }
#else
    Keep keep;
    std::memcpy(&keep, kLaneMasks<I, kWidth>.lanes[bits & ((1u << kWidth) - 1)], sizeof(keep));
    return reinterpret_cast<V>((reinterpret_cast<Keep>(kept) & keep) | (reinterpret_cast<Keep>(dropped) & ~keep));
#endif
  }

  // A kept value, with any NaN written as the canonical NaN (docs/semantics.md,
  // "Values", NaN bits; the CUDA kernels do the same). The 16-bit types get it
  // from store(); float and double here.
  static V kept_canonical(V v) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const Keep canonical = Keep{} + static_cast<I>(std::numeric_limits<std::make_unsigned_t<I>>::max() >> 1);
      return v != v ? reinterpret_cast<V>(canonical) : v;
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
  bool streaming;  // whole chunks of the output written with non-temporal stores

  // Elements e .. e + kChunk - 1 (all inside the tensor), with their keep
  // bits (bit j for element e + j) and the first one's column.
  inline void chunk(int64_t e, uint32_t bits, int64_t col) const {
    lanes(in + e, E == Epilogue::Scale ? nullptr : residual + e, out + e, bits, col, streaming);
  }

  // The last n < kChunk elements go through the same code via stack copies.
  inline void partial_chunk(int64_t e, int64_t n, uint32_t bits, int64_t col) const {
    T x[kChunk] = {};
    R r[kChunk] = {};
    Y y[kChunk];
    std::memcpy(x, in + e, sizeof(T) * n);
    if (E != Epilogue::Scale) std::memcpy(r, residual + e, sizeof(R) * n);
    lanes(x, r, y, bits & ((uint32_t{1} << n) - 1), col, false);
    std::memcpy(out + e, y, sizeof(Y) * n);
  }

  inline void lanes(const T* x, const R* r, Y* y, uint32_t bits, int64_t col, bool stream) const {
    if constexpr (kWholeUnits && E != Epilogue::AddBiasResidual) {
      if (bits == 0) {  // dropped: the input is not even read
        for (int q = 0; q < L::kParts; ++q) {
          const int first = q * L::kWidth;
          V dropped{};
          if constexpr (E != Epilogue::Scale) dropped = Lanes<R>::load(r + first);
          if constexpr (!std::is_same_v<R, Y>) dropped = Lanes<Y>::kept_canonical(dropped);
          Lanes<Y>::store(y + first, dropped, stream);
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
      const V result = kWholeUnits && bits == kAllKept ? kept : L::select(bits >> first, kept, dropped);
      Lanes<Y>::store(y + first, result, stream);
    }
  }

  // Elements [e, e + n) (e a multiple of 8) with the keep bits of their
  // groups in bytes[0, ceil(n / 8)); `col` is e's column, and is moved on.
  inline void groups(int64_t e, int64_t n, const uint8_t* bytes, int64_t& col) const {
    auto chunk_bits = [&](int64_t j, int bytes_left) {
      uint32_t bits = bytes[j * L::kGroups];
      if (L::kGroups == 2 && bytes_left > 1) bits |= uint32_t{bytes[j * L::kGroups + 1]} << kUnitsPerGroup;
      return bits;
    };
    const int64_t full = n / kChunk;
    for (int64_t j = 0; j < full; ++j) {
      chunk(e + j * kChunk, chunk_bits(j, L::kGroups), col);
      if constexpr (E == Epilogue::AddBiasResidual) {
        col += kChunk;
        while (col >= bias_len) col -= bias_len;
      }
    }
    const int64_t rest = n - full * kChunk;
    if (rest > 0) {
      partial_chunk(e + full * kChunk, rest, chunk_bits(full, static_cast<int>((rest + 7) / 8)), col);
      if constexpr (E == Epilogue::AddBiasResidual) col = (col + rest) % bias_len;
    }
  }

  // Elements [e, e + n), all kept or all dropped: a scaled copy, or zeros
  // (or the residual) written without reading the input.
  inline void run(int64_t e, int64_t n, bool keep) const {
    static_assert(kWholeUnits && E != Epilogue::AddBiasResidual, "runs of whole units");
    const int64_t full = n / kChunk * kChunk;
    if (keep) {
      for (int64_t k = 0; k < full; k += kChunk) chunk(e + k, kAllKept, 0);
      if (full < n) partial_chunk(e + full, n - full, kAllKept, 0);
    } else {
      for (int64_t k = 0; k < full; k += kChunk) chunk(e + k, 0, 0);
      if (full < n) partial_chunk(e + full, n - full, 0, 0);
    }
  }
};

// Units of at least this many elements are applied a run at a time (unit
// masks); shorter ones go through per-element bytes like element masks.
constexpr int64_t kRunElements = 64;

template <class O, Epilogue E, MaskSource S>
void run_groups_typed(const KernelCall& c, int64_t g_begin, int64_t g_end) {
  using T = typename O::InT;
  using C = typename Lanes<T>::C;
  const Apply<O, E, S == MaskSource::Units> apply{static_cast<const T*>(c.in),
                                                  static_cast<const typename O::ResidualT*>(c.residual),
                                                  static_cast<const typename O::BiasT*>(c.bias),
                                                  static_cast<typename O::OutT*>(c.out),
                                                  c.bias_len,
                                                  typename Lanes<T>::V{} + static_cast<C>(c.scale),
                                                  stream_output(c.out, sizeof(typename O::OutT), g_begin * kUnitsPerGroup,
                                                                std::min(c.numel, g_end * kUnitsPerGroup), c.numel)};
  const int64_t e_end = std::min(c.numel, g_end * kUnitsPerGroup);
  if constexpr (S == MaskSource::Units && E != Epilogue::AddBiasResidual) {
    const UnitLayout& u = c.units;
    if (u.inner >= kRunElements) {
      for (int64_t e = g_begin * kUnitsPerGroup; e < e_end;) {
        const int64_t len = std::min(u.inner - e % u.inner, e_end - e);
        apply.run(e, len, bit_at(c.mask_in, (e / u.block) * u.channels + (e / u.inner) % u.channels));
        e += len;
      }
      return;
    }
  }
  const int64_t full_groups = c.numel / kUnitsPerGroup;
  const int64_t tail = c.numel % kUnitsPerGroup;
  int64_t col = E == Epilogue::AddBiasResidual ? (g_begin * kUnitsPerGroup) % c.bias_len : 0;
  uint8_t local[kBlockGroups];
  auto each_block = [&](auto&& block_bytes) {
    for (int64_t g0 = g_begin; g0 < g_end; g0 += kBlockGroups) {
      const int64_t count = std::min(kBlockGroups, g_end - g0);
      const uint8_t* bytes = block_bytes(g0, count);
      if (c.out == nullptr) continue;  // only the mask was asked for
      const int64_t e = g0 * kUnitsPerGroup;
      apply.groups(e, std::min(count * kUnitsPerGroup, c.numel - e), bytes, col);
    }
  };
  if constexpr (S == MaskSource::Draw) {
    uint64_t seed, offset;
    c.rng.unpack(seed, offset);
    const PhiloxLanes philox(seed, offset, c.threshold);
    each_block([&](int64_t g0, int64_t count) {
      uint8_t* dst = c.mask_out != nullptr ? c.mask_out + g0 : local;
      if (c.shard.sharded()) {
        draw_shard_bytes(c, philox, g0, count, dst);  // padding bits stay 0
      } else {
        philox.draw_bytes(g0, count, dst);
        if (tail != 0 && g0 + count > full_groups) dst[count - 1] &= (1u << tail) - 1;  // padding bits are 0
      }
      return static_cast<const uint8_t*>(dst);
    });
  } else if constexpr (S == MaskSource::Elements) {
    each_block([&](int64_t g0, int64_t) { return c.mask_in + g0; });
  } else {
    each_block([&](int64_t g0, int64_t count) {
      unit_bytes(c, g0, count, local);
      return static_cast<const uint8_t*>(local);
    });
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

// The two mixes of dtypes, where the output's differs from the input's:
//   widening:  a 16-bit input T, a float32 output, and a residual (and bias)
//              of T or float32: autocast's residual forms, forward;
//   narrowing: a float32 input, a 16-bit output T, no residual: grad through
//              a mask (or the mask drawn again) straight into the gradient of
//              a 16-bit input whose output was float32, backward. Kept
//              values are rounded once, from float32 to T, as in a cast.
template <class T>
void run_groups_widening(const KernelCall& c, int64_t g_begin, int64_t g_end) {
  const bool float_residual = c.residual_dtype == ScalarKind::Float;
  const bool float_bias = c.bias_dtype == ScalarKind::Float;
  if (c.epilogue == Epilogue::AddResidual) {
    return run_groups_with_source<OperandTypes<T, float, T, float>, Epilogue::AddResidual>(c, g_begin, g_end);
  }
  if (c.epilogue != Epilogue::AddBiasResidual) throw std::logic_error("widening mix: a residual form only");
  if (float_residual && float_bias) {
    return run_groups_with_source<OperandTypes<T, float, float, float>, Epilogue::AddBiasResidual>(c, g_begin, g_end);
  }
  if (float_residual) {
    return run_groups_with_source<OperandTypes<T, float, T, float>, Epilogue::AddBiasResidual>(c, g_begin, g_end);
  }
  return run_groups_with_source<OperandTypes<T, T, float, float>, Epilogue::AddBiasResidual>(c, g_begin, g_end);
}

template <class T>
void run_groups_narrowing(const KernelCall& c, int64_t g_begin, int64_t g_end) {
  if (c.epilogue != Epilogue::Scale) throw std::logic_error("narrowing mix: Epilogue::Scale only");
  return run_groups_with_source<OperandTypes<float, float, float, T>, Epilogue::Scale>(c, g_begin, g_end);
}

// ------------------------------------------------------ bias gradients

// The keep bits of elements e .. e + 56 (or to the mask's end, then 0s):
// one unaligned 8-byte read where the mask has 8 bytes left.
inline uint64_t mask_window(const uint8_t* mask, int64_t mask_len, int64_t e) {
  const int64_t byte = e >> 3;
  uint64_t window = 0;
  if (byte + 8 <= mask_len) {
    std::memcpy(&window, mask + byte, 8);
  } else {
    std::memcpy(&window, mask + byte, static_cast<size_t>(mask_len - byte));
  }
  return window >> (e & 7);
}

// v rounded to T (round to nearest even, canonical NaN), as store() rounds.
template <class T>
inline void store_one(T* p, typename Lanes<T>::C v) {
  T lanes[Lanes<T>::kWidth];
  Lanes<T>::store(lanes, Lanes<T>::kept_canonical(typename Lanes<T>::V{} + v));
  *p = lanes[0];
}

// A range of a bias gradient (column_sums.h): chunks [chunk_begin,
// chunk_end) of columns [col_begin, col_end). grad_input = keep ? grad * s : 0
// is written over it; each column's sums are added in the plan's order:
// rows in order into their lane's accumulator, then the lanes in order. Each
// chunk's sums go to `partial` (a row of accumulators per chunk), or, with
// partial == nullptr and all chunks in the range, are added in chunk order
// and rounded once into the T result.
//
// Memory is read in runs as long as the accumulators allow (column_block):
// where the range is whole rows whose lanes' accumulators fit, a chunk is one
// run, element i of it adding into accumulator i % (lanes x cols), its
// lane's for its column; otherwise a row's block of columns at a time. (Rows
// read in blocks took half again as long as rows read whole, measured with
// benchmarks/kernel_speed.cpp.)
template <class T>
void column_sums_typed(const KernelCall& c, const ColumnSumPlan& plan, const ColumnRange& range, void* partial,
                       void* scratch) {
  using L = Lanes<T>;
  using C = typename L::C;
  using V = typename L::V;
  constexpr int kChunk = L::kChunk;
  const T* grad = static_cast<const T*>(c.in);
  T* out = static_cast<T*>(c.out);
  const int64_t mask_len = mask_bytes(c.numel);
  const V scale = V{} + static_cast<C>(c.scale);
  const int64_t lanes = plan.lanes;
  const int64_t most = column_block(plan, range);
  const bool whole_rows = range.whole_rows(plan) && most == plan.cols;
  static_assert(kChunk <= 64, "column_sum_slots() leaves 64 accumulators of slack");
  C* sums = static_cast<C*>(scratch);        // a vector of slack past them: whole vectors add +0 there
  C* folded = sums + lanes * most + kChunk;  // the chunks' sums so far, by column

  const bool streaming = stream_output(out, sizeof(T), range.chunk_begin * plan.chunk_rows * plan.cols,
                                       std::min(plan.rows, range.chunk_end * plan.chunk_rows) * plan.cols, c.numel);
  // grad_input of the kChunk elements at x into y, added into acc.
  auto add_chunk = [&](const T* x, T* y, uint32_t bits, C* acc, bool stream) {
    for (int q = 0; q < L::kParts; ++q) {
      const int first = q * L::kWidth;
      const V value = L::select(bits >> first, L::kept_canonical(L::load(x + first) * scale), V{});
      L::store(y + first, value, stream);
      V sum;
      std::memcpy(&sum, acc + first, sizeof(V));
      sum += value;
      std::memcpy(acc + first, &sum, sizeof(V));
    }
  };
  // grad_input of elements [e, e + count), added into acc[0, count): 32
  // elements per read of the mask, then the rest, the last chunk through
  // stack copies.
  auto accumulate = [&](int64_t e, int64_t count, C* acc) {
    int64_t k = 0;
    for (; k + 32 <= count; k += 32) {
      const uint64_t window = mask_window(c.mask_in, mask_len, e + k);
      for (int h = 0; h < 32; h += kChunk) {
        add_chunk(grad + e + k + h, out + e + k + h, static_cast<uint32_t>(window >> h), acc + k + h, streaming);
      }
    }
    for (; k < count; k += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, count - k));
      const uint32_t bits = static_cast<uint32_t>(mask_window(c.mask_in, mask_len, e + k)) & ((uint32_t{1} << n) - 1);
      if (n == kChunk) {
        add_chunk(grad + e + k, out + e + k, bits, acc + k, streaming);
      } else {
        T x[kChunk] = {}, y[kChunk];
        std::memcpy(x, grad + e + k, sizeof(T) * n);
        add_chunk(x, y, bits, acc + k, false);  // whole vectors: past n it adds +0, which changes no sum
        std::memcpy(out + e + k, y, sizeof(T) * n);
      }
    }
  };

  for (int64_t col0 = range.col_begin; col0 < range.col_end; col0 += most) {
    const int64_t width = std::min(most, range.col_end - col0);
    std::fill(folded, folded + width, C(0));
    for (int64_t chunk = range.chunk_begin; chunk < range.chunk_end; ++chunk) {
      const int64_t begin = chunk * plan.chunk_rows, end = std::min(plan.rows, begin + plan.chunk_rows);
      std::fill(sums, sums + lanes * width + kChunk, C(0));
      if (whole_rows) {
        const int64_t period = lanes * width;
        for (int64_t i = 0, n = (end - begin) * width; i < n;) {
          const int64_t count = std::min(n - i, period - i % period);
          accumulate(begin * width + i, count, sums + i % period);
          i += count;
        }
      } else {
        for (int64_t r = begin; r < end; ++r) {
          accumulate(r * plan.cols + col0, width, sums + (r - begin) % lanes * width);
        }
      }
      // Lane 0's sums are never -0 (sums of values start at +0), so adding
      // the others into them is the fold from +0.
      for (int64_t l = 1; l < lanes; ++l) {
        for (int64_t j = 0; j < width; ++j) sums[j] += sums[l * width + j];
      }
      if (partial != nullptr) {
        std::memcpy(static_cast<C*>(partial) + chunk * plan.cols + col0, sums, sizeof(C) * width);
      } else {
        for (int64_t j = 0; j < width; ++j) folded[j] += sums[j];
      }
    }
    if (partial == nullptr) {
      for (int64_t j = 0; j < width; ++j) store_one(static_cast<T*>(c.bias_grad) + col0 + j, folded[j]);
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
  const auto dispatch = [&] {
    const bool half_out = c.out_dtype == ScalarKind::Half;
    if (c.out_dtype != c.dtype && c.dtype == ScalarKind::Float) {
      return half_out ? run_groups_narrowing<Half>(c, g_begin, g_end)
                      : run_groups_narrowing<BFloat16>(c, g_begin, g_end);
    }
    if (c.out_dtype != c.dtype) {
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
  };
  dispatch();
  drain_stores();
}

void column_sums(const KernelCall& c, const ColumnSumPlan& plan, const ColumnRange& range, void* partial,
                 void* scratch) {
  const auto dispatch = [&] {
    switch (c.dtype) {
      case ScalarKind::Float:
        return column_sums_typed<float>(c, plan, range, partial, scratch);
      case ScalarKind::Double:
        return column_sums_typed<double>(c, plan, range, partial, scratch);
      case ScalarKind::Half:
        return column_sums_typed<Half>(c, plan, range, partial, scratch);
      case ScalarKind::BFloat16:
        return column_sums_typed<BFloat16>(c, plan, range, partial, scratch);
    }
  };
  dispatch();
  drain_stores();
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
