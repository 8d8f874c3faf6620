// The CPU norm kernels: dropout + residual + LayerNorm/RMSNorm over rows,
// forward and backward (norm/norm_call.h says what they compute).
//
// norm_{baseline,avx2,avx512}.cpp each include this file once, after
// `#pragma GCC target(...)` and with REGDROP_CPU_ISA naming a namespace, as
// kernels.h is; norm_cpu.cpp picks a copy at run time.
//
// One pass over memory per row: a row's operands are read once and its
// outputs written once; in between, the row's values stay in a scratch row
// (L1 up to 8K floats, L2 beyond) for the statistics' second and third
// sweeps. Elements are handled a group of 8 at a time (one mask byte), as
// vectors of 8 lanes of the compute type; the row sums add group j into
// lanes 8j mod L, the vertical adds of row_order.h's step 1, whose order is
// thereby the same for every vector width and thread count.
//
// Keep bits: element masks are those of dropout_add (the group of element
// e = row * hidden + col is e / 8), drawn with the element family's vector
// Philox (philox_lanes.h) as a row's sweep reaches them (RowBits), or read
// from a mask; a shard's bits and unit bits are drawn ahead (norm_cpu.cpp).

#if !defined(REGDROP_CPU_ISA)
#error "define REGDROP_CPU_ISA before including norm_kernels.h"
#endif

#include "philox_lanes.h"

namespace regdrop::cpu::REGDROP_CPU_ISA {
namespace {

using norm::NormBackwardCall;
using norm::NormForwardCall;
using norm::NormKind;

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef int16_t i16x8 __attribute__((vector_size(16)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef int64_t i64x8 __attribute__((vector_size(64)));

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// The 8 lanes of a group in the compute type C (float; double for float64),
// and the lane masks that select between two of them.
template <class C>
struct Group8;
template <>
struct Group8<float> {
  using V = f32x8;
  using M = i32x8;
};
template <>
struct Group8<double> {
  using V = f64x8;
  using M = i64x8;
};

template <class T>
using ComputeOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class C>
using Vec = typename Group8<C>::V;
template <class C>
using Mask = typename Group8<C>::M;

template <class C>
inline Vec<C> blend(Mask<C> keep, Vec<C> a, Vec<C> b) {
  using M = Mask<C>;
  return reinterpret_cast<Vec<C>>((reinterpret_cast<M>(a) & keep) | (reinterpret_cast<M>(b) & ~keep));
}

// All lanes set where bit j of `byte` is set, for lane j (lane_masks.h).
template <class C>
inline Mask<C> keep_mask(uint32_t byte) {
  using M = Mask<C>;
  using I = std::remove_reference_t<decltype(M{}[0])>;
  M keep;
  std::memcpy(&keep, kLaneMasks<I, 8>.lanes[byte & 0xFF], sizeof(keep));
  return keep;
}

// Lanes 0 .. n - 1 set.
template <class C>
inline Mask<C> first_lanes(int n) {
  using M = Mask<C>;
  const M lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return lane < n;
}

template <class C>
inline Vec<C> canonical(Vec<C> v) {
  using M = Mask<C>;
  using I = std::remove_reference_t<decltype(M{}[0])>;
  const M nan = v != v;
  const M bits = M{} + static_cast<I>(std::numeric_limits<std::make_unsigned_t<I>>::max() >> 1);
  return reinterpret_cast<Vec<C>>((reinterpret_cast<M>(v) & ~nan) | (bits & nan));
}

// ------------------------------------------------------- loads and stores

// 8 elements of T from p (all in the tensor), widened to the compute type.
template <class T>
inline Vec<ComputeOf<T>> load8(const T* p) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    Vec<T> v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else if constexpr (std::is_same_v<T, BFloat16>) {
#if defined(REGDROP_ISA_AVX2) || defined(REGDROP_ISA_AVX512)
    // One widening load: GCC splits __builtin_convertvector's into halves.
    return reinterpret_cast<f32x8>(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    return reinterpret_cast<f32x8>(__builtin_convertvector(h, u32x8) << 16);
#endif
  } else {
#if defined(REGDROP_ISA_AVX2) || defined(REGDROP_ISA_AVX512)
    return reinterpret_cast<f32x8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    f32x8 v;
    for (int j = 0; j < 8; ++j) v[j] = cuda::half_bits_to_float(p[j].bits);
    return v;
#endif
  }
}

// v rounded to T (nearest even) into p, with any NaN written as the dtype's
// canonical NaN, as the CUDA bodies write it (cuda/primitives.h).
template <class T>
inline void store8(T* p, Vec<ComputeOf<T>> v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const Vec<T> c = canonical<T>(v);
    std::memcpy(p, &c, sizeof(c));
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    const u32x8 u = reinterpret_cast<u32x8>(v);
    const u32x8 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
#if defined(REGDROP_ISA_AVX512)
    // NaN lanes found by one compare into a mask register and set by one
    // masked move (as for float16 below), then one narrowing (the rounded
    // values fit 16 bits). Against the AVX2 form, whose compare is integer
    // ops: norm rows in L2 (one thread) about 9% faster in bf16, 8% in fp16,
    // forward and backward.
    const __m256i bits = _mm256_mask_mov_epi32(reinterpret_cast<__m256i>(rounded),
                                               _mm256_cmp_ps_mask(reinterpret_cast<__m256>(v), reinterpret_cast<__m256>(v),
                                                                  _CMP_UNORD_Q),
                                               _mm256_set1_epi32(cuda::kCanonicalNaN16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtepi32_epi16(bits));
#else
    const i32x8 nan = reinterpret_cast<i32x8>((u & 0x7FFFFFFFu) > 0x7F800000u);
    const u32x8 bits = (rounded & ~reinterpret_cast<u32x8>(nan)) | ((u32x8{} + cuda::kCanonicalNaN16) & reinterpret_cast<u32x8>(nan));
    const u16x8 h = __builtin_convertvector(bits, u16x8);
    std::memcpy(p, &h, sizeof(h));
#endif
  } else {
#if defined(REGDROP_ISA_AVX2) || defined(REGDROP_ISA_AVX512)
    const __m128i h = _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#if defined(REGDROP_ISA_AVX512)
    const __m128i bits = _mm_mask_mov_epi16(
        h, _mm256_cmp_ps_mask(reinterpret_cast<__m256>(v), reinterpret_cast<__m256>(v), _CMP_UNORD_Q),
        _mm_set1_epi16(static_cast<short>(cuda::kCanonicalNaN16)));
#else
    const i16x8 nan = __builtin_convertvector(v != v, i16x8);
    const i16x8 bits = (reinterpret_cast<i16x8>(h) & ~nan) | ((i16x8{} + static_cast<int16_t>(cuda::kCanonicalNaN16)) & nan);
#endif
    std::memcpy(p, &bits, sizeof(bits));
#else
    for (int j = 0; j < 8; ++j) p[j].bits = cuda::half_bits_rne(v[j]);
#endif
  }
}

// The first n (1 to 8) elements; the other lanes read as +0.
template <class T>
inline Vec<ComputeOf<T>> load_n(const T* p, int n) {
  if (n == 8) return load8(p);
  T tmp[8];
  std::memset(tmp, 0, sizeof(tmp));
  std::memcpy(tmp, p, sizeof(T) * n);
  return load8(tmp);
}

template <class T>
inline void store_n(T* p, Vec<ComputeOf<T>> v, int n) {
  if (n == 8) return store8(p, v);
  T tmp[8];
  store8(tmp, v);
  std::memcpy(p, tmp, sizeof(T) * n);
}

// v rounded to T and stored (n elements), and what was stored, widened back.
// A float or double is stored as it is (NaNs canonical): kept in registers,
// not read back, as a 16-byte read of a 32-byte store stalls.
template <class T>
inline Vec<ComputeOf<T>> store_and_reload(T* p, Vec<ComputeOf<T>> v, int n) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const Vec<T> c = canonical<T>(v);
    if (n == 8) {
      std::memcpy(p, &c, sizeof(c));
    } else {
      std::memcpy(p, &c, sizeof(T) * n);
    }
    return c;
  }
  T tmp[8];
  store8(tmp, v);
  if (n == 8) {
    std::memcpy(p, tmp, sizeof(tmp));
  } else {
    std::memcpy(p, tmp, sizeof(T) * n);
  }
  return load8(tmp);
}

// ----------------------------------------------------------- keep bits

// Bits [bit0, bit0 + n) of src into dst (bit c of byte c / 8), bits past n 0.
inline void copy_bits(const uint8_t* src, int64_t bit0, int64_t n, uint8_t* dst) {
  const int shift = static_cast<int>(bit0 & 7);
  const uint8_t* s = src + (bit0 >> 3);
  const int64_t last = (bit0 + n - 1) >> 3;  // the last source byte, relative to src
  const int64_t bytes = (n + 7) / 8;
  for (int64_t j = 0; j < bytes; ++j) {
    uint32_t v = s[j] >> shift;
    if (shift != 0 && (bit0 >> 3) + j + 1 <= last) v |= static_cast<uint32_t>(s[j + 1]) << (8 - shift);
    dst[j] = static_cast<uint8_t>(v);
  }
  if (n % 8 != 0) dst[bytes - 1] &= static_cast<uint8_t>((1u << (n % 8)) - 1);
}

// The keep bits of a call's rows, one row at a time, in the row's own bytes
// (bit c for column c). A row that starts on a group boundary (every row
// where hidden % 8 == 0) draws its groups kLanes at a time as its sweep
// reaches them (draw_through), interleaving the draw's arithmetic with the
// sweep's loads and stores (8-16% faster at 1024 x 768 fp32, one thread,
// AVX2, than drawing blocks of rows ahead); a row that starts inside a
// group draws all of its groups at once and shifts them into place. A group that straddles two rows is drawn by both
// (its bits depend on its index alone); its mask byte is written by the
// row that holds its first element, so that rows can run on any threads.
class RowBits {
 public:
  RowBits(const norm::RowBits& b, int64_t numel, int64_t hidden)
      : b_(b), numel_(numel), hidden_(hidden), bytes_((hidden + 7) / 8), philox_(lanes_of(b)),
        row_(static_cast<size_t>(bytes_)), spanned_(static_cast<size_t>(bytes_ + 1)) {}

  // Row r is next.
  void start(int64_t r) {
    const int64_t first = r * hidden_;
    if (!b_.element_units) {  // the row's one unit: all bits set or none
      const int64_t unit = r / b_.rows_per_unit;
      row_byte_ = b_.mask_in == nullptr || ((b_.mask_in[unit >> 3] >> (unit & 7)) & 1) ? 0xFF : 0;
      return;
    }
    first_group_ = first / 8;
    keep_ = row_.data();
    drawn_ = bytes_;
    if (!b_.draw) {
      if (first % 8 == 0) {
        keep_ = b_.mask_in + first_group_;
      } else {
        copy_bits(b_.mask_in, first, hidden_, row_.data());
      }
    } else if (first % 8 == 0) {
      drawn_ = 0;
    } else {
      philox_.draw_bytes(first_group_, spanned_groups(r), spanned_.data());
      copy_bits(spanned_.data(), first % 8, hidden_, row_.data());
    }
  }

  // Draws the row's bytes up to byte j (of those it has).
  void draw_through(int64_t j) {
    if (drawn_ <= j && drawn_ < bytes_) draw_more(j);
  }

  // Whether the row draws its bytes as its sweep reaches them.
  bool drawing() const { return drawn_ < bytes_; }

  // The row's keep bytes, byte j for its group j (elements 8j .. 8j + 7 of
  // the row), once drawn; bits past the row's end are any bits (the kernels
  // use the lanes of a row's elements only).
  const uint8_t* bytes() const { return keep_; }

  // The whole row's byte (0xFF or 0) where a row is one unit.
  uint32_t row_byte() const { return row_byte_; }

  // After row r's sweep: the mask bytes it owns into mask_out, the padding
  // bits past the last element 0.
  void finish(int64_t r) {
    if (!(b_.draw && b_.element_units && b_.mask_out != nullptr)) return;
    uint8_t* out = b_.mask_out + first_group_;
    if (r * hidden_ % 8 == 0) {
      draw_through(bytes_ - 1);
      std::memcpy(out, row_.data(), static_cast<size_t>(bytes_));
    } else {  // the first group belongs to the row before
      std::memcpy(out + 1, spanned_.data() + 1, static_cast<size_t>(spanned_groups(r) - 1));
    }
    if ((r + 1) * hidden_ == numel_ && numel_ % 8 != 0) {
      b_.mask_out[numel_ / 8] &= static_cast<uint8_t>((1u << (numel_ % 8)) - 1);
    }
  }

 private:
  static PhiloxLanes lanes_of(const norm::RowBits& b) {
    uint64_t seed = 0, offset = 0;
    if (b.draw) b.rng.unpack(seed, offset);
    return PhiloxLanes(seed, offset, b.threshold);
  }

  // Not inlined: Philox inlined into the row kernels crowded their other
  // loops' registers (the loops without a draw ran 10% slower, measured in
  // L2 at hidden 768 on AVX2).
  __attribute__((noinline)) void draw_more(int64_t j) {
    for (; drawn_ <= j && drawn_ < bytes_; drawn_ += kLanes) {
      philox_.draw_bytes(first_group_ + drawn_, std::min<int64_t>(kLanes, bytes_ - drawn_), row_.data() + drawn_);
    }
  }

  // The groups row r's elements touch.
  int64_t spanned_groups(int64_t r) const { return ((r + 1) * hidden_ + 7) / 8 - first_group_; }

  const norm::RowBits& b_;
  int64_t numel_, hidden_, bytes_;
  PhiloxLanes philox_;
  std::vector<uint8_t> row_;      // the row's bytes, where it does not read mask_in in place
  std::vector<uint8_t> spanned_;  // the groups of a row that starts inside a group
  const uint8_t* keep_ = nullptr;
  int64_t first_group_ = 0, drawn_ = 0;
  uint32_t row_byte_ = 0;
};

// Adds v's first n lanes (the others as +0, which changes no sum: a sum
// that starts at +0 is never -0) into the 8 values at a.
template <class C>
inline void add_into(C* a, Vec<C> v, int n) {
  if (n < 8) v = blend<C>(first_lanes<C>(n), v, Vec<C>{});
  Vec<C> sum;
  std::memcpy(&sum, a, sizeof(sum));
  sum = norm::add_rn(sum, v);
  std::memcpy(a, &sum, sizeof(sum));
}

// fold_group's additions on one vector's 8 lanes: the high 4 lanes onto the
// low 4, then lanes 2-3 onto 0-1, then lane 1 onto lane 0.
template <class C>
inline C fold_vector(Vec<C> a) {
  const auto b = norm::add_rn(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  const auto c = norm::add_rn(__builtin_shufflevector(b, b, 0, 1), __builtin_shufflevector(b, b, 2, 3));
  return norm::add_rn(c[0], c[1]);
}

// fold_group for 8 threads at once (thread t's lane sums in a[t]), the
// same additions transposed so that each vector add takes one step for
// several threads: returns the 8 thread sums, thread t's in lane t.
template <class C>
inline Vec<C> fold_eight(const Vec<C>* a) {
  Vec<C> b[4], c[2];
  for (int i = 0; i < 4; ++i) {  // b[i] = [4 sums of thread 2i | of 2i + 1]: lane k + lane k + 4
    b[i] = norm::add_rn(__builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11),
                        __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15));
  }
  for (int i = 0; i < 2; ++i) {  // c[i]: 2 sums each of threads 4i, 4i + 2, 4i + 1, 4i + 3: k + (k + 2)
    c[i] = norm::add_rn(__builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13),
                        __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15));
  }
  return norm::add_rn(__builtin_shufflevector(c[0], c[1], 0, 4, 2, 6, 8, 12, 10, 14),
                      __builtin_shufflevector(c[0], c[1], 1, 5, 3, 7, 9, 13, 11, 15));
}

// Steps 2 and 3 of row_order.h from the L = 8T lane sums (overwritten): the
// row's sum. Step 2 takes the threads 8 at a time (fold_eight; missing
// threads, where T < 8, fold to +0), into lanes[0 .. T). Step 3's halvings
// of 8 or more are vertical vector adds; the last three are fold_group's
// additions on the first vector (fold_vector), where the +0s of missing
// threads change nothing, as no thread sum is -0. (Scalar code, folding
// took 8% of a ViT-S forward's time at hidden 384, and 19% of a backward's
// with one fold per thread.)
template <class C>
inline C fold_lanes(C* lanes, uint32_t threads) {
  Vec<C> v;
  if (threads == 1) {
    std::memcpy(&v, lanes, sizeof(v));
    return fold_vector<C>(v);
  }
  for (uint32_t t0 = 0; t0 < threads; t0 += 8) {
    Vec<C> a[8];
    for (uint32_t t = 0; t < 8; ++t) {
      a[t] = Vec<C>{};
      if (t0 + t < threads) std::memcpy(&a[t], lanes + 8 * (t0 + t), sizeof(Vec<C>));
    }
    v = fold_eight<C>(a);
    std::memcpy(lanes + t0, &v, sizeof(v));  // over thread t0 / 8's sums, already read
  }
  for (uint32_t h = threads / 2; h >= 8; h /= 2) {
    for (uint32_t t = 0; t < h; t += 8) {
      Vec<C> x, y;
      std::memcpy(&x, lanes + t, sizeof(x));
      std::memcpy(&y, lanes + t + h, sizeof(y));
      x = norm::add_rn(x, y);
      std::memcpy(lanes + t, &x, sizeof(x));
    }
  }
  std::memcpy(&v, lanes, sizeof(v));
  return fold_vector<C>(v);
}

// Group j of a row into its lanes: [8j mod L, + 8) of the L lane sums.
template <class C>
inline void add_lanes(C* acc, int64_t j, int64_t lanes, Vec<C> v, int n) {
  add_into<C>(acc + ((8 * j) & (lanes - 1)), v, n);
}

template <class C>
inline Vec<C> load_values(const C* p, int n) {
  return load_n(p, n);
}

// A row's elements go a group of 8 at a time through `group(j, n)`: the
// full groups, then the tail group (n < 8) if any. Inlined into each loop,
// so that the full groups' loop knows n == 8 and makes no calls, which would
// make the compiler keep the loop's constants on the stack.
template <class Group>
__attribute__((always_inline)) inline void for_each_group(int64_t hidden, Group&& group) {
  const int64_t full = hidden / 8;
  for (int64_t j = 0; j < full; ++j) group(j, 8);
  if (hidden % 8 != 0) group(full, static_cast<int>(hidden % 8));
}

// The same, for a sweep that draws the row's keep bits: kLanes groups' bits
// (one Philox step), then those groups.
template <class Group>
__attribute__((always_inline)) inline void for_each_group(int64_t hidden, RowBits& bits, Group&& group) {
  const int64_t full = hidden / 8;
  for (int64_t j0 = 0; j0 < full; j0 += kLanes) {
    const int64_t j1 = std::min<int64_t>(full, j0 + kLanes);
    bits.draw_through(j1 - 1);
    for (int64_t j = j0; j < j1; ++j) group(j, 8);
  }
  if (hidden % 8 != 0) {
    bits.draw_through(full);
    group(full, static_cast<int>(hidden % 8));
  }
}

// Calls sweep(keep_of, each_group): keep_of(j) gives group j's keep mask,
// each_group(group) runs a for_each_group loop. The mask is built from the
// row's bits, drawn in step with the loop where the row draws them, or, where
// the whole row is one unit (drop-path, or p == 0), it is the row's one
// mask: each case is compiled on its own, so that the loops that do not
// draw are the plain loop, and the whole-row loop builds no mask per group.
template <class C, class Sweep>
__attribute__((always_inline)) inline void with_keep_masks(int64_t hidden, bool whole_rows, RowBits& bits,
                                                           Sweep&& sweep) {
  // The pointer by value: the sweeps' stores (memcpy) may alias any member.
  auto keep_of = [keep = bits.bytes()](int64_t j) { return keep_mask<C>(keep[j]); };
  auto plain = [hidden](auto&& group) __attribute__((always_inline)) { for_each_group(hidden, group); };
  if (whole_rows) {
    const Mask<C> row = keep_mask<C>(bits.row_byte());
    sweep([row](int64_t) { return row; }, plain);
  } else if (bits.drawing()) {
    sweep(keep_of, [hidden, &bits](auto&& group) __attribute__((always_inline)) { for_each_group(hidden, bits, group); });
  } else {
    sweep(keep_of, plain);
  }
}

// ---------------------------------------------------------------- forward

template <class T, class R, bool kResidual, bool kInputBias>
void forward_rows_typed(const NormForwardCall& c, int64_t r0, int64_t r1) {
  using C = ComputeOf<T>;
  using V = Vec<C>;
  const int64_t H = c.hidden, G = norm::row_groups(H);
  const uint32_t threads = norm::threads_per_row(H);
  const int64_t L = 8 * int64_t{threads};
  std::vector<C> scratch(static_cast<size_t>(8 * G + L));
  C* const sv = scratch.data();  // the row's residual stream, as the norm reads it
  C* const acc = sv + 8 * G;
  const C* weight = static_cast<const C*>(c.weight);
  const C* bias = static_cast<const C*>(c.bias);
  const C* input_bias = static_cast<const C*>(c.input_bias);
  const T* in = static_cast<const T*>(c.input);
  const R* residual = static_cast<const R*>(c.residual);
  T* out = static_cast<T*>(c.output);
  R* residual_out = static_cast<R*>(c.residual_out);
  const V scale = V{} + static_cast<C>(c.scale);
  const C eps = static_cast<C>(c.eps);
  const C inverse_hidden = norm::inverse_hidden<C>(H);
  const bool layer = c.kind == NormKind::Layer, whole_rows = !c.bits.element_units;
  RowBits bits(c.bits, c.rows * H, H);

  for (int64_t r = r0; r < r1; ++r) {
    bits.start(r);
    const int64_t row = r * H;
    // The residual stream and its sum.
    std::fill(acc, acc + L, C(0));
    with_keep_masks<C>(H, whole_rows, bits, [&](auto keep_of, auto each_group) __attribute__((always_inline)) {
      each_group([&](int64_t j, int n) __attribute__((always_inline)) {
        const int64_t e = row + 8 * j;
        V rv{}, bv{};
        if constexpr (kResidual) rv = load_n(residual + e, n);
        if constexpr (kInputBias) bv = load_values(input_bias + 8 * j, n);
        const V v = norm::branch_value<kInputBias>(load_n(in + e, n), bv);
        const V s = blend<C>(keep_of(j), norm::kept_sum<kResidual>(v, rv, scale), rv);
        const V stored = store_and_reload(residual_out + e, s, n);
        std::memcpy(sv + 8 * j, &stored, sizeof(V));
        if (layer) add_lanes<C>(acc, j, L, stored, n);
      });
    });
    bits.finish(r);
    const C mean = layer ? norm::row_mean(fold_lanes<C>(acc, threads), inverse_hidden) : C(0);
    const V meanv = V{} + mean;
    std::fill(acc, acc + L, C(0));
    for_each_group(H, [&](int64_t j, int n) __attribute__((always_inline)) {
      V s;
      std::memcpy(&s, sv + 8 * j, sizeof(V));
      add_lanes<C>(acc, j, L, norm::squared_deviation(s, meanv), n);
    });
    const C rstd = norm::inverse_std(norm::row_mean(fold_lanes<C>(acc, threads), inverse_hidden), eps, layer);
    const V rstdv = V{} + rstd;
    for_each_group(H, [&](int64_t j, int n) __attribute__((always_inline)) {
      V s;
      std::memcpy(&s, sv + 8 * j, sizeof(V));
      const V y = norm::affine(norm::normalized(s, meanv, rstdv), load_values(weight + 8 * j, n),
                               load_values(bias + 8 * j, n));
      store_n(out + row + 8 * j, y, n);
    });
    static_cast<C*>(c.mean)[r] = canonical<C>(meanv)[0];
    static_cast<C*>(c.rstd)[r] = canonical<C>(rstdv)[0];
  }
}

template <class T, class R>
void forward_rows_operands(const NormForwardCall& c, int64_t r0, int64_t r1) {
  const bool residual = c.residual != nullptr, input_bias = c.input_bias != nullptr;
  if (residual && input_bias) return forward_rows_typed<T, R, true, true>(c, r0, r1);
  if (residual) return forward_rows_typed<T, R, true, false>(c, r0, r1);
  if (input_bias) return forward_rows_typed<T, R, false, true>(c, r0, r1);
  return forward_rows_typed<T, R, false, false>(c, r0, r1);
}

// --------------------------------------------------------------- backward

// Which parameter-gradient terms a backward adds into lane sums: none, the
// weight's and the bias's (LayerNorm's usual case, without branches), or
// any that are wanted.
enum class Sums { None, WeightAndBias, Wanted };

template <class T, class R, bool kGradResidualOut, Sums kSums>
void backward_rows_typed(const NormBackwardCall& c, int64_t r0, int64_t r1, uint32_t lanes, void* lane_sums) {
  using C = ComputeOf<T>;
  using V = Vec<C>;
  const int64_t H = c.hidden, G = norm::row_groups(H);
  const uint32_t threads = norm::threads_per_row(H);
  const int64_t L = 8 * int64_t{threads};
  std::vector<C> scratch(static_cast<size_t>(16 * G + 2 * L));
  C* const zv = scratch.data();  // the row's z
  C* const dzv = zv + 8 * G;     // and dz = grad_output * weight
  C* const acc_a = dzv + 8 * G;
  C* const acc_b = acc_a + L;
  const C* weight = static_cast<const C*>(c.weight);
  const T* grad_out = static_cast<const T*>(c.grad_output);
  const R* grad_residual_out = static_cast<const R*>(c.grad_residual_out);
  const R* residual_out = static_cast<const R*>(c.residual_out);
  T* grad_in = static_cast<T*>(c.grad_input);
  R* grad_residual = static_cast<R*>(c.grad_residual);
  const V scale = V{} + static_cast<C>(c.scale);
  const C inverse_hidden = norm::inverse_hidden<C>(H);
  const bool layer = c.kind == NormKind::Layer, whole_rows = !c.bits.element_units;
  const int64_t width = 8 * G;  // of a lane of lane_sums
  C* const sums[3] = {c.grad_weight == nullptr ? nullptr : static_cast<C*>(lane_sums),
                      c.grad_bias == nullptr ? nullptr : static_cast<C*>(lane_sums) + int64_t{lanes} * width,
                      c.grad_input_bias == nullptr ? nullptr : static_cast<C*>(lane_sums) + 2 * int64_t{lanes} * width};
  RowBits bits(c.bits, c.rows * H, H);

  auto row_backward = [&](int64_t r, int64_t lane) {
    bits.start(r);
    const int64_t row = r * H;
    const V meanv = V{} + static_cast<const C*>(c.mean)[r];
    const V rstdv = V{} + static_cast<const C*>(c.rstd)[r];
    std::fill(acc_a, acc_a + 2 * L, C(0));
    // Sweep 1: z, dz, the row sums, and the weight and bias terms.
    for_each_group(H, [&](int64_t j, int n) __attribute__((always_inline)) {
      const int64_t e = row + 8 * j, at = lane * width + 8 * j;
      const V dy = load_n(grad_out + e, n);
      const V z = norm::normalized(load_n(residual_out + e, n), meanv, rstdv);
      const V dz = norm::mul_rn(dy, load_values(weight + 8 * j, n));
      std::memcpy(zv + 8 * j, &z, sizeof(V));
      std::memcpy(dzv + 8 * j, &dz, sizeof(V));
      if (layer) add_lanes<C>(acc_a, j, L, dz, n);
      add_lanes<C>(acc_b, j, L, norm::mul_rn(dz, z), n);
      if constexpr (kSums == Sums::WeightAndBias) {
        add_into<C>(sums[0] + at, norm::mul_rn(dy, z), n);
        add_into<C>(sums[1] + at, dy, n);
      } else if constexpr (kSums == Sums::Wanted) {
        if (sums[0] != nullptr) add_into<C>(sums[0] + at, norm::mul_rn(dy, z), n);
        if (sums[1] != nullptr) add_into<C>(sums[1] + at, dy, n);
      }
    });
    const V a = V{} + (layer ? norm::row_mean(fold_lanes<C>(acc_a, threads), inverse_hidden) : C(0));
    const V b = V{} + norm::row_mean(fold_lanes<C>(acc_b, threads), inverse_hidden);
    // Sweep 2: the gradients, and the input bias's term.
    with_keep_masks<C>(H, whole_rows, bits, [&](auto keep_of, auto each_group) __attribute__((always_inline)) {
      each_group([&](int64_t j, int n) __attribute__((always_inline)) {
        const int64_t e = row + 8 * j;
        V z, dz;
        std::memcpy(&z, zv + 8 * j, sizeof(V));
        std::memcpy(&dz, dzv + 8 * j, sizeof(V));
        V ds = norm::sum_gradient(dz, z, a, b, rstdv);
        if constexpr (kGradResidualOut) ds = norm::add_rn(ds, load_n(grad_residual_out + e, n));
        if (grad_residual != nullptr) store_n(grad_residual + e, ds, n);
        const V dx = blend<C>(keep_of(j), norm::mul_rn(ds, scale), V{});
        store_n(grad_in + e, dx, n);
        if constexpr (kSums == Sums::Wanted) {
          if (sums[2] != nullptr) add_into<C>(sums[2] + lane * width + 8 * j, dx, n);
        }
      });
    });
  };

  // In row order (which the hardware prefetches; lane by lane, which keeps
  // a lane's sums in L1, was slower).
  for (int64_t r = r0; r < r1; ++r) row_backward(r, (r - r0) % lanes);
}

template <class T, class R, bool kGradResidualOut>
void backward_rows_sums(const NormBackwardCall& c, int64_t r0, int64_t r1, uint32_t lanes, void* lane_sums) {
  if (lane_sums == nullptr) return backward_rows_typed<T, R, kGradResidualOut, Sums::None>(c, r0, r1, lanes, lane_sums);
  if (c.grad_weight != nullptr && c.grad_bias != nullptr && c.grad_input_bias == nullptr) {
    return backward_rows_typed<T, R, kGradResidualOut, Sums::WeightAndBias>(c, r0, r1, lanes, lane_sums);
  }
  return backward_rows_typed<T, R, kGradResidualOut, Sums::Wanted>(c, r0, r1, lanes, lane_sums);
}

template <class T, class R>
void backward_rows_operands(const NormBackwardCall& c, int64_t r0, int64_t r1, uint32_t lanes, void* lane_sums) {
  if (c.grad_residual_out != nullptr) return backward_rows_sums<T, R, true>(c, r0, r1, lanes, lane_sums);
  return backward_rows_sums<T, R, false>(c, r0, r1, lanes, lane_sums);
}

// The operand types: one dtype throughout, or a 16-bit input with a float32
// residual stream.
template <template <class, class> class Body, class... Args>
void dispatch_operands(ScalarKind dtype, ScalarKind residual_dtype, Args&&... args) {
  const bool wide = residual_dtype != dtype;
  switch (dtype) {
    case ScalarKind::Float:
      return Body<float, float>::run(args...);
    case ScalarKind::Double:
      return Body<double, double>::run(args...);
    case ScalarKind::Half:
      return wide ? Body<Half, float>::run(args...) : Body<Half, Half>::run(args...);
    case ScalarKind::BFloat16:
      return wide ? Body<BFloat16, float>::run(args...) : Body<BFloat16, BFloat16>::run(args...);
  }
}

template <class T, class R>
struct Forward {
  static void run(const NormForwardCall& c, int64_t r0, int64_t r1) { forward_rows_operands<T, R>(c, r0, r1); }
};

template <class T, class R>
struct Backward {
  static void run(const NormBackwardCall& c, int64_t r0, int64_t r1, uint32_t lanes, void* sums) {
    backward_rows_operands<T, R>(c, r0, r1, lanes, sums);
  }
};

}  // namespace

// The entry points, one set per instruction set (norm_isa.h).
void norm_forward_rows(const NormForwardCall& c, int64_t row_begin, int64_t row_end) {
  dispatch_operands<Forward>(c.dtype, c.residual_dtype, c, row_begin, row_end);
}

void norm_backward_rows(const NormBackwardCall& c, int64_t row_begin, int64_t row_end, uint32_t lanes,
                        void* lane_sums) {
  dispatch_operands<Backward>(c.dtype, c.residual_dtype, c, row_begin, row_end, lanes, lane_sums);
}

}  // namespace regdrop::cpu::REGDROP_CPU_ISA
