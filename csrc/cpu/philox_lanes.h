// Philox in vector lanes, one group of 8 units per 64-bit lane: the CPU's
// vector form of philox.h's group_keep_bits(), shared by the element kernels
// (kernels.h) and the norm kernels (norm_kernels.h).
//
// Included by those headers, inside their instruction set's namespace: once
// per copy, compiled for that copy's instruction set (REGDROP_ISA_AVX512,
// REGDROP_ISA_AVX2 or neither). Requires <cstring> and <immintrin.h> (on
// x86) and "../philox.h", included before the pragma.
#pragma once

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
// Philox runs one group per 64-bit lane, kPhiloxVectors vectors at a time
// for independent work in flight: kLanes groups per step (AVX-512 32, AVX2
// 12, baseline 6): a round is a chain of dependent multiplies, and three
// chains keep the multiplier busier than two (measured in L1 on AVX2:
// Philox 12% faster with three vectors than with two, and four, which
// crowd AVX2's 16 registers, slower than three). A lane's
// low 32 bits are its Philox word. Its high 32 bits are whatever the
// previous round left there, and nothing reads them: the multiply takes the
// low halves only, and xor and shifts keep lanes apart.
constexpr int kWordLanes = kVectorBytes / 8;
#if defined(REGDROP_ISA_AVX512)
constexpr int kPhiloxVectors = 4;
#else
constexpr int kPhiloxVectors = 3;
#endif
constexpr int kLanes = kPhiloxVectors * kWordLanes;

typedef uint64_t u64xQ __attribute__((vector_size(kVectorBytes)));
typedef uint16_t u16xH __attribute__((vector_size(kVectorBytes)));
typedef int16_t i16xH __attribute__((vector_size(kVectorBytes)));
typedef uint8_t u8xQ __attribute__((vector_size(kWordLanes)));

// The low halves of a's lanes times m: 64-bit products (pmuludq).
inline u64xQ mul_low_halves(u64xQ a, uint32_t m) {
#if defined(REGDROP_ISA_AVX512)
  return reinterpret_cast<u64xQ>(_mm512_mul_epu32(reinterpret_cast<__m512i>(a), _mm512_set1_epi64(m)));
#elif defined(REGDROP_ISA_AVX2)
  return reinterpret_cast<u64xQ>(_mm256_mul_epu32(reinterpret_cast<__m256i>(a), _mm256_set1_epi64x(m)));
#elif defined(__x86_64__)
  return reinterpret_cast<u64xQ>(_mm_mul_epu32(reinterpret_cast<__m128i>(a), _mm_set1_epi64x(m)));
#else
  return (a & 0xFFFFFFFFu) * m;
#endif
}

// Per lane, the low halves of a and b as one 64-bit value (a's low, b's high):
// four 16-bit uniforms in unit order.
inline u64xQ pair_words(u64xQ a, u64xQ b) {
#if defined(REGDROP_ISA_AVX512)
  return reinterpret_cast<u64xQ>(
      _mm512_mask_shuffle_epi32(reinterpret_cast<__m512i>(a), 0xAAAA, reinterpret_cast<__m512i>(b), _MM_PERM_CDAB));
#else
  return (a & 0xFFFFFFFFu) | (b << 32);
#endif
}

// The mask bytes of the groups in the lanes of c (words c[0..3]), one per
// lane, into out[0, kWordLanes). threshold < 2^16.
inline void keep_bytes(const u64xQ (&c)[4], uint16_t threshold, uint8_t* out) {
  // Per lane, four 16-bit uniforms: units 0-3 in `low`, 4-7 in `high`.
  const u16xH low = reinterpret_cast<u16xH>(pair_words(c[0], c[1]));
  const u16xH high = reinterpret_cast<u16xH>(pair_words(c[2], c[3]));
#if defined(REGDROP_ISA_AVX512)
  // Compares give a bit per uniform; each lane's four 16-bit flags (bit m,
  // bit 4 + m) have disjoint bits below 256, so psadbw's byte sum is their union.
  u16xH unit_bit;
  for (int j = 0; j < kVectorBytes / 2; ++j) unit_bit[j] = static_cast<uint16_t>(1u << (j % 4));
  const __m512i t = _mm512_set1_epi16(static_cast<short>(threshold));
  const __m512i flags = _mm512_or_si512(
      _mm512_maskz_mov_epi16(_mm512_cmpge_epu16_mask(reinterpret_cast<__m512i>(low), t),
                             reinterpret_cast<__m512i>(unit_bit)),
      _mm512_maskz_mov_epi16(_mm512_cmpge_epu16_mask(reinterpret_cast<__m512i>(high), t),
                             reinterpret_cast<__m512i>(unit_bit << 4)));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out),
                   _mm512_cvtepi64_epi8(_mm512_sad_epu8(flags, _mm512_setzero_si512())));
#elif defined(__x86_64__)
  // Compare masks packed to bytes (signed saturation keeps -1 and 0), then
  // one bit per uniform: per 128-bit half, the nibbles run [units 0-3 of its
  // two groups][units 4-7 of them]; the middle two of each 16 bits swap.
  const i16xH keep_low = low >= threshold, keep_high = high >= threshold;
#if defined(REGDROP_ISA_AVX2)
  const uint32_t bits = static_cast<uint32_t>(_mm256_movemask_epi8(
      _mm256_packs_epi16(reinterpret_cast<__m256i>(keep_low), reinterpret_cast<__m256i>(keep_high))));
#else
  const uint32_t bits = static_cast<uint32_t>(_mm_movemask_epi8(
      _mm_packs_epi16(reinterpret_cast<__m128i>(keep_low), reinterpret_cast<__m128i>(keep_high))));
#endif
  const uint32_t bytes = (bits & 0xF00FF00Fu) | ((bits & 0x00F000F0u) << 4) | ((bits & 0x0F000F00u) >> 4);
  std::memcpy(out, &bytes, kWordLanes);
#else
  u16xH unit_bit;
  for (int j = 0; j < kVectorBytes / 2; ++j) unit_bit[j] = static_cast<uint16_t>(1u << (j % 4));
  const u64xQ f = reinterpret_cast<u64xQ>((reinterpret_cast<u16xH>(low >= threshold) & unit_bit) |
                                          (reinterpret_cast<u16xH>(high >= threshold) & (unit_bit << 4)));
  const u8xQ packed = __builtin_convertvector(f | f >> 16 | f >> 32 | f >> 48, u8xQ);
  std::memcpy(out, &packed, sizeof(packed));
#endif
}

// A call's Philox stream in vector lanes: its round keys and counter words
// 2-3, broadcast once, read from memory by each round.
struct PhiloxLanes {
  u64xQ key0[kPhiloxRounds], key1[kPhiloxRounds];
  u64xQ offset_lo, offset_hi;
  uint32_t threshold;

  PhiloxLanes(uint64_t seed, uint64_t offset, uint32_t keep_threshold) : threshold(keep_threshold) {
    const PhiloxBlock counter = group_counter(0, offset);
    offset_lo = u64xQ{} + counter.w[2];
    offset_hi = u64xQ{} + counter.w[3];
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      key0[round] = u64xQ{} + k0;
      key1[round] = u64xQ{} + k1;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
  }

  // The mask bytes of groups g0 .. g0 + kLanes - 1 into out[0, kLanes): the
  // vector form of group_keep_bits() in philox.h, lane i of vector v
  // computing group g0 + v * kWordLanes + i. threshold < 2^16.
  void draw(uint64_t g0, uint8_t* out) const {
    u64xQ lane;
    for (int i = 0; i < kWordLanes; ++i) lane[i] = static_cast<uint64_t>(i);
    u64xQ c[kPhiloxVectors][4];
    for (int v = 0; v < kPhiloxVectors; ++v) {
      const u64xQ group = lane + (g0 + static_cast<uint64_t>(v * kWordLanes));
      c[v][0] = group;
      c[v][1] = group >> 32;
      c[v][2] = offset_lo;
      c[v][3] = offset_hi;
    }
    // Unrolled: the words change roles each round, which a loop pays for in moves.
#pragma GCC unroll 10
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int v = 0; v < kPhiloxVectors; ++v) {
        const u64xQ p0 = mul_low_halves(c[v][0], kPhiloxM0);
        const u64xQ p1 = mul_low_halves(c[v][2], kPhiloxM1);
        c[v][0] = (p1 >> 32) ^ c[v][1] ^ key0[round];
        c[v][1] = p1;
        c[v][2] = (p0 >> 32) ^ c[v][3] ^ key1[round];
        c[v][3] = p0;
      }
    }
    for (int v = 0; v < kPhiloxVectors; ++v) keep_bytes(c[v], static_cast<uint16_t>(threshold), out + v * kWordLanes);
  }

  // The mask bytes of groups [g0, g0 + count).
  void draw_bytes(int64_t g0, int64_t count, uint8_t* bytes) const {
    // Uniforms are below 2^16: a threshold of 2^16 (p == 1) keeps nothing.
    if (threshold >= 65536) {
      std::memset(bytes, 0, static_cast<size_t>(count));
      return;
    }
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes) draw(static_cast<uint64_t>(g0 + i), bytes + i);
    if (i < count) {
      uint8_t last[kLanes];
      draw(static_cast<uint64_t>(g0 + i), last);
      std::memcpy(bytes + i, last, static_cast<size_t>(count - i));
    }
  }
};

}  // namespace
}  // namespace regdrop::cpu::REGDROP_CPU_ISA
