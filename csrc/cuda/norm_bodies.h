// What one block of each CUDA norm kernel does (norm/norm_call.h says what
// they compute), written once for nvcc and for the host emulation
// (tests/cuda_emulation/emulated_norm.cpp), which runs every block of the
// real launch plan (norm_launch.h) and compares with the CPU kernels bit for
// bit.
//
// A block program is a sequence of phases separated by barriers, over a
// Block that provides
//   b.each(f)   run f(thread, state) for the block's threads: on the device
//               the calling thread with its registers (`state`), on the host
//               every thread in turn with its own saved state;
//   b.sync()    a barrier (__syncthreads(); nothing on the host, where each
//               phase has run for every thread before the next begins).
// Shared memory is a struct the kernel declares __shared__ and the host
// allocates. Control flow between phases depends on the block alone.
//
// Layout (row_order.h): blocks of kRowBlockThreads = 256 threads hold
// `slots` = 256 / T rows at once, T = threads_per_row(hidden) threads each.
// Thread t of a row handles the 8-element groups t, t + T, t + 2T, ...
// (consecutive threads, consecutive 16-byte accesses), keeps each group
// position's lane sum in a register, folds its 8 lane sums (fold_group), and
// the row's T sums halve in shared memory: the order the CPU kernels follow.
// Rows of up to 4T groups (hidden <= 8192) stay in registers between the
// statistics' sweeps ("cached" kernels); longer rows (T = 256) are read
// again from global memory, the residual stream from the thread's own
// writes ("streamed" kernels).
//
// Forward: one block per `slots` rows. Backward: one block per chunk of the
// column plan; its rows pass through the slots in order, each slot adding
// its rows' weight, bias and input-bias gradient terms into its own
// registers (a lane of the plan), folded in slot order at the end into the
// chunk's partial sums; fold_chunks_thread then adds the chunks in order.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../norm/norm_call.h"
#include "../norm/row_math.h"
#include "../norm/row_order.h"
#include "thread_bodies.h"

namespace regdrop::cuda {

using norm::kRowBlockThreads;
using norm::kRowGroupsPerThread;

// Where a kernel's keep bits come from: drawn from Philox (element units,
// the call's own stream), or read: a mask of element bits, a bit per run of
// rows (drop-path), or none (every element kept).
enum class RowSource : uint8_t { Draw, Read };

struct RowBitsParams {
  bool element_units = true;
  PhiloxSource rng;
  uint32_t threshold = 0;
  uint8_t* __restrict__ mask_out = nullptr;       // Draw: the mask, or null
  int64_t* __restrict__ rng_state_out = nullptr;  // receives the unpacked (seed, offset), or null
  const uint8_t* __restrict__ mask_in = nullptr;  // Read
  FastDivmod rows_per_unit;                       // Read, row units (rows below 2^31)
  int64_t numel = 0;
};

// Shared by the forward and backward parameters.
struct RowShape {
  int64_t rows = 0;
  int64_t hidden = 0;
  uint32_t groups = 0;   // ceil(hidden / 8)
  uint32_t threads = 1;  // T, per row
  uint32_t thread_shift = 0;  // log2(T)
  uint32_t slots = 1;    // rows a block holds at once
  float inverse_hidden_f = 1.0f;  // 1 / hidden, rounded once (norm/row_math.h)
  double inverse_hidden_d = 1.0;
  bool layer = true;     // LayerNorm (else RMSNorm: mean 0)
  bool vector = false;   // hidden % 8 == 0 and the row operands 16-byte aligned
  bool parameter_vector = false;  // hidden % 8 == 0 and the parameter rows 16-byte aligned
};

struct NormForwardParams {
  RowShape shape;
  const void* input = nullptr;
  const void* residual = nullptr;    // or null
  const void* input_bias = nullptr;  // compute type, or null
  const void* weight = nullptr;      // compute type
  const void* bias = nullptr;        // compute type
  void* output = nullptr;
  void* residual_out = nullptr;
  void* mean = nullptr;
  void* rstd = nullptr;
  float scale_f = 1.0f, eps_f = 0.0f;
  double scale_d = 1.0, eps_d = 0.0;
  RowBitsParams bits;
};

struct NormBackwardParams {
  RowShape shape;
  const void* grad_output = nullptr;
  const void* grad_residual_out = nullptr;  // or null
  const void* residual_out = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  const void* weight = nullptr;  // compute type
  void* grad_input = nullptr;
  void* grad_residual = nullptr;  // or null
  void* partial = nullptr;        // [3][chunks][hidden] of the compute type, or null: no parameter gradients
  void* lane_sums = nullptr;      // streamed kernels: [3][chunks][slots][8 * groups], the slots' sums
  int64_t chunk_rows = 1;
  int64_t chunks = 1;
  float scale_f = 1.0f;
  double scale_d = 1.0;
  RowBitsParams bits;
};

// ------------------------------------------------------------- keep bits

REGDROP_HOST_DEVICE uint32_t bit_at64(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1u; }

// Mask byte g of a call of `numel` units: the group's bits, none past the end.
REGDROP_HOST_DEVICE uint8_t mask_byte(uint32_t bits, uint64_t g, int64_t numel) {
  const int64_t left = numel - static_cast<int64_t>(8 * g);
  return static_cast<uint8_t>(left >= 8 ? bits : bits & ((1u << left) - 1));
}

// The keep bits of elements e0 .. e0 + n - 1 of row `row` (bit j for
// e0 + j). Drawing, a thread also writes the mask byte whose first element
// its group holds, if it lies in the row: bytes straddling two rows are
// drawn by both and written by the first. kAligned: e0 % 8 == 0 and n == 8
// (rows of a multiple of 8), known at compile time, so that the vector path
// holds one Philox draw and one mask byte per group, not the straddling
// case's two.
template <RowSource S, bool kAligned>
REGDROP_HOST_DEVICE uint32_t group_bits(const RowBitsParams& b, uint64_t seed, uint64_t offset, int64_t row,
                                        int64_t e0, int64_t row_end, int n) {
  const uint32_t valid = kAligned ? 0xFFu : (1u << n) - 1;
  if constexpr (S == RowSource::Draw) {
    const uint64_t g = static_cast<uint64_t>(e0) / 8;
    const uint32_t shift = kAligned ? 0u : static_cast<uint32_t>(e0 % 8);
    const uint32_t low = group_keep_bits(seed, offset, g, b.threshold);
    if (shift == 0) {
      if (b.mask_out != nullptr) b.mask_out[g] = mask_byte(low, g, b.numel);
      return low & valid;
    }
    const uint32_t high = group_keep_bits(seed, offset, g + 1, b.threshold);
    if (b.mask_out != nullptr && static_cast<int64_t>(8 * (g + 1)) < row_end) {
      b.mask_out[g + 1] = mask_byte(high, g + 1, b.numel);
    }
    return ((low >> shift) | (high << (8 - shift))) & valid;
  } else {
    if (!b.element_units) {
      return b.mask_in == nullptr || bit_at64(b.mask_in, b.rows_per_unit.div(static_cast<uint32_t>(row))) ? valid : 0u;
    }
    if constexpr (kAligned) return b.mask_in[e0 >> 3];
    const uint32_t window = b.mask_in[e0 >> 3] | (static_cast<uint32_t>(b.mask_in[(e0 + n - 1) >> 3]) << 8);
    return (window >> (e0 & 7)) & valid;
  }
}

// --------------------------------------------------------------- helpers

template <class C>
REGDROP_HOST_DEVICE C compute_as(float f, double d) {
  if constexpr (std::is_same_v<C, double>) {
    return d;
  } else {
    return f;
  }
}

// 8 values of a compute-type parameter row from column 8g.
template <class C>
REGDROP_HOST_DEVICE Group<C> load_parameters(const void* row, uint32_t g, int n, bool vector) {
  Group<C> v;
  v.load(static_cast<const C*>(row) + 8 * static_cast<int64_t>(g), n, vector && n == 8);
  return v;
}

// The groups of thread t of a row: t, t + T, ... below G; j counts them
// (kCached: at most kRowGroupsPerThread, unrolled).
template <bool kCached, class F>
REGDROP_HOST_DEVICE void for_each_group(uint32_t t, uint32_t threads, uint32_t groups, F&& f) {
  if constexpr (kCached) {
#pragma unroll
    for (int j = 0; j < kRowGroupsPerThread; ++j) {
      const uint32_t g = t + static_cast<uint32_t>(j) * threads;
      if (g < groups) f(g, j);
    }
  } else {
    for (uint32_t g = t; g < groups; g += threads) f(g, 0);
  }
}

// Step 3 of row_order.h: each row's T thread sums (sums[slot * T + t])
// halve into sums[slot * T]; barrier after each step.
template <class Block, class... Sums>
REGDROP_HOST_DEVICE void halve_rows(Block& b, uint32_t threads, Sums*... sums) {
  for (uint32_t h = threads / 2; h >= 1; h /= 2) {
    b.each([&](uint32_t tid, auto&) {
      if ((tid & (threads - 1)) < h) ((sums[tid] = norm::add_rn(sums[tid], sums[tid + h])), ...);
    });
    b.sync();
  }
}

template <class Y, class C>
REGDROP_HOST_DEVICE C stored(C v) {
  return kept_canonical<Y>(v);  // float and double: the canonical NaN; 16-bit types get it when packed
}

// acc[k] += v(k) for the group's n elements; full groups without a test
// per element.
template <class C, class F>
REGDROP_HOST_DEVICE void accumulate(C* acc, int n, F&& v) {
  if (n == 8) {
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = norm::add_rn(acc[k], v(k));
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (k < n) acc[k] = norm::add_rn(acc[k], v(k));
    }
  }
}

// A group's elements to p (n of them), on the vector path as 128-bit
// stores that the compiler keeps whole: Group::store's uint4 copies come
// out as four 32-bit stores in bodies this large (the PTX vectorizer gives
// up on some), so the device path stores through __stcg (st.global.cg.v4:
// cached in L2 only, as streamed outputs should be).
template <class T>
REGDROP_HOST_DEVICE void store_group(const Group<T>& g, void* p, int n, bool vector) {
  if (!vector) return g.store(p, n, false);
#pragma unroll
  for (int i = 0; i < Group<T>::kWords / 4; ++i) {
    void* dst = static_cast<uint8_t*>(p) + 16 * i;
#if defined(__CUDA_ARCH__)
    __stcg(static_cast<uint4*>(dst), make_uint4(g.w[4 * i], g.w[4 * i + 1], g.w[4 * i + 2], g.w[4 * i + 3]));
#else
    store16(dst, g.w + 4 * i);
#endif
  }
}

// ---------------------------------------------------------------- forward

template <class T, class R, RowSource S, bool kCached>
struct NormForwardBlock {
  using C = Compute<T>;
  static_assert(std::is_same_v<C, Compute<R>>, "operands compute in one type");
  static constexpr int kCache = kCached ? kRowGroupsPerThread : 1;

  struct State {
    Group<R> s[kCache];  // the residual stream as stored (kCached)
    C mean, rstd;
  };
  struct Shared {
    C a[kRowBlockThreads];
    C b[kRowBlockThreads];
  };

  // The block program, instantiated for rows on the vector path (every
  // group full and 16-byte aligned: no per-element tests, one draw per
  // group) and for the rest; the branch is the block's, taken once.
  template <class Block>
  REGDROP_HOST_DEVICE static void run(const NormForwardParams& p, uint32_t block, Block& b, Shared& sh) {
    if (p.shape.vector) {
      rows<true>(p, block, b, sh);
    } else {
      rows<false>(p, block, b, sh);
    }
  }

  template <bool kVector, class Block>
  REGDROP_HOST_DEVICE static void rows(const NormForwardParams& p, uint32_t block, Block& b, Shared& sh) {
    const RowShape& shape = p.shape;
    const uint32_t per_row = shape.threads;
    const int64_t H = shape.hidden;
    const C inverse_hidden = compute_as<C>(shape.inverse_hidden_f, shape.inverse_hidden_d);
    uint64_t seed = 0, offset = 0;
    if constexpr (S == RowSource::Draw) p.bits.rng.unpack(seed, offset);
    auto row_of = [&](uint32_t tid) { return static_cast<int64_t>(block) * shape.slots + (tid >> shape.thread_shift); };
    auto count = [&](uint32_t g) {
      return kVector || H - 8 * static_cast<int64_t>(g) >= 8 ? 8 : static_cast<int>(H - 8 * int64_t{g});
    };

    // The residual stream: written, kept, and summed.
    b.each([&](uint32_t tid, State& st) {
      if (block == 0 && tid == 0 && p.bits.rng_state_out != nullptr) {
        p.bits.rng.unpack(seed, offset);
        p.bits.rng_state_out[0] = static_cast<int64_t>(seed);
        p.bits.rng_state_out[1] = static_cast<int64_t>(offset);
      }
      const int64_t row = row_of(tid);
      C acc[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = 0;
      if (row < shape.rows) {
        const C scale = compute_as<C>(p.scale_f, p.scale_d);
        for_each_group<kCached>((tid & (per_row - 1)), per_row, shape.groups, [&](uint32_t g, int j) {
          const int n = count(g);
          const int64_t e0 = row * H + 8 * int64_t{g};
          constexpr bool vector = kVector;
          Group<T> x;
          Group<R> r;
          x.load(static_cast<const typename Element<T>::Bits*>(p.input) + e0, n, vector);
          if (p.residual != nullptr) r.load(static_cast<const typename Element<R>::Bits*>(p.residual) + e0, n, vector);
          Group<C> ib;
          if (p.input_bias != nullptr) ib = load_parameters<C>(p.input_bias, g, n, shape.parameter_vector);
          const uint32_t keep = group_bits<S, kVector>(p.bits, seed, offset, row, e0, row * H + H, n);
          Group<R> s;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            C pair[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int e = 2 * k + h;
              const C v = p.input_bias != nullptr ? norm::branch_value<true>(x.get(e), ib.get(e)) : x.get(e);
              C value;
              if (p.residual != nullptr) {
                value = (keep >> e) & 1u ? norm::kept_sum<true>(v, r.get(e), scale) : r.get(e);
              } else {
                value = (keep >> e) & 1u ? norm::kept_sum<false>(v, C(0), scale) : C(0);
              }
              pair[h] = stored<R>(value);
            }
            s.set_pair(k, pair[0], pair[1]);
          }
          store_group(s, static_cast<typename Element<R>::Bits*>(p.residual_out) + e0, n, vector);
          if constexpr (kCached) st.s[j] = s;
          accumulate(acc, n, [&](int k) { return s.get(k); });
        });
      }
      sh.a[tid] = norm::fold_group(acc);
    });
    b.sync();
    if (shape.layer) halve_rows(b, per_row, sh.a);

    // The variance's sum.
    b.each([&](uint32_t tid, State& st) {
      const int64_t row = row_of(tid);
      st.mean = shape.layer ? norm::row_mean(sh.a[tid & ~(per_row - 1)], inverse_hidden) : C(0);
      C acc[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = 0;
      if (row < shape.rows) {
        for_each_group<kCached>((tid & (per_row - 1)), per_row, shape.groups, [&](uint32_t g, int j) {
          const int n = count(g);
          const Group<R> s = reload(p, st, row * H + 8 * int64_t{g}, j, n, kVector);
          accumulate(acc, n, [&](int k) { return norm::squared_deviation(s.get(k), st.mean); });
        });
      }
      sh.b[tid] = norm::fold_group(acc);
    });
    b.sync();
    halve_rows(b, per_row, sh.b);

    // The output.
    b.each([&](uint32_t tid, State& st) {
      const int64_t row = row_of(tid);
      if (row >= shape.rows) return;
      st.rstd = norm::inverse_std(norm::row_mean(sh.b[tid & ~(per_row - 1)], inverse_hidden),
                                  compute_as<C>(p.eps_f, p.eps_d), shape.layer);
      if ((tid & (per_row - 1)) == 0) {
        static_cast<C*>(p.mean)[row] = canonical_nan(st.mean);
        static_cast<C*>(p.rstd)[row] = canonical_nan(st.rstd);
      }
      for_each_group<kCached>((tid & (per_row - 1)), per_row, shape.groups, [&](uint32_t g, int j) {
        const int n = count(g);
        const int64_t e0 = row * H + 8 * int64_t{g};
        constexpr bool vector = kVector;
        const Group<R> s = reload(p, st, e0, j, n, vector);
        const Group<C> w = load_parameters<C>(p.weight, g, n, shape.parameter_vector);
        const Group<C> bias = load_parameters<C>(p.bias, g, n, shape.parameter_vector);
        Group<T> y;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          C pair[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int e = 2 * k + h;
            pair[h] = stored<T>(norm::affine(norm::normalized(s.get(e), st.mean, st.rstd), w.get(e), bias.get(e)));
          }
          y.set_pair(k, pair[0], pair[1]);
        }
        store_group(y, static_cast<typename Element<T>::Bits*>(p.output) + e0, n, vector);
      });
    });
  }

  // Group j of the thread's row, as stored: from registers, or read back.
  REGDROP_HOST_DEVICE static Group<R> reload(const NormForwardParams& p, const State& st, int64_t e0, int j, int n,
                                             bool vector) {
    if constexpr (kCached) {
      return st.s[j];
    } else {
      Group<R> s;
      s.load(static_cast<const typename Element<R>::Bits*>(p.residual_out) + e0, n, vector);
      return s;
    }
  }
};

// --------------------------------------------------------------- backward

// Backward kernels read their bits (norm_launch.h draws a low-memory call's first).
template <class T, class R, bool kCached>
struct NormBackwardBlock {
  static constexpr RowSource S = RowSource::Read;
  using C = Compute<T>;
  static_assert(std::is_same_v<C, Compute<R>>, "operands compute in one type");
  static constexpr int kCache = kCached ? kRowGroupsPerThread : 1;
  static constexpr int kTerms = 3;  // weight, bias, input_bias
  // Lane sums of the slots are folded through shared memory a tile of
  // columns at a time: slots x hidden values, 4096 at a time.
  static constexpr int kFoldTile = 4096;

  struct State {
    Group<T> dy[kCache];  // kCached: the row's grad_output
    Group<R> s[kCache];   // and residual stream
    uint32_t keep[kCache];
    C mean, rstd, a, b;
    C terms[kCached ? kTerms * 8 * kRowGroupsPerThread : 1];  // this slot's parameter-gradient sums (kCached)
  };
  struct Shared {
    C a[kRowBlockThreads];
    C b[kRowBlockThreads];
    C fold[kCached ? kFoldTile : 1];
  };

  // As the forward's: instantiated for vector rows and for the rest.
  template <class Block>
  REGDROP_HOST_DEVICE static void run(const NormBackwardParams& p, uint32_t chunk, Block& b, Shared& sh) {
    if (p.shape.vector) {
      rows<true>(p, chunk, b, sh);
    } else {
      rows<false>(p, chunk, b, sh);
    }
  }

  template <bool kVector, class Block>
  REGDROP_HOST_DEVICE static void rows(const NormBackwardParams& p, uint32_t chunk, Block& b, Shared& sh) {
    const RowShape& shape = p.shape;
    const uint32_t per_row = shape.threads;
    const int64_t H = shape.hidden;
    const int64_t first = static_cast<int64_t>(chunk) * p.chunk_rows;
    const int64_t end = first + p.chunk_rows < shape.rows ? first + p.chunk_rows : shape.rows;
    const bool terms = p.partial != nullptr;
    const C inverse_hidden = compute_as<C>(shape.inverse_hidden_f, shape.inverse_hidden_d);
    const uint64_t seed = 0, offset = 0;  // read bits need no stream
    auto count = [&](uint32_t g) {
      return kVector || H - 8 * static_cast<int64_t>(g) >= 8 ? 8 : static_cast<int>(H - 8 * int64_t{g});
    };
    C* const lane_sums = static_cast<C*>(p.lane_sums);
    if (terms) {
      b.each([&](uint32_t tid, State& st) {
        if constexpr (kCached) {
#pragma unroll
          for (int i = 0; i < kTerms * 8 * kRowGroupsPerThread; ++i) st.terms[i] = 0;
        } else {
          C* const lane = lane_sums + lane_index(p, 0, chunk, tid >> shape.thread_shift);
          const int64_t stride = lane_index(p, 1, 0, 0);
          for_each_group<false>(tid & (per_row - 1), per_row, shape.groups, [&](uint32_t g, int) {
#pragma unroll
            for (int q = 0; q < kTerms; ++q) {
#pragma unroll
              for (int k = 0; k < 8; ++k) lane[q * stride + 8 * int64_t{g} + k] = 0;
            }
          });
        }
      });
    }
    for (int64_t batch = first; batch < end; batch += shape.slots) {
      // The row sums of dz and dz * z.
      b.each([&](uint32_t tid, State& st) {
        const int64_t row = batch + (tid >> shape.thread_shift);
        C acc_a[8], acc_b[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) acc_a[k] = acc_b[k] = 0;
        if (row < end) {
          st.mean = static_cast<const C*>(p.mean)[row];
          st.rstd = static_cast<const C*>(p.rstd)[row];
          for_each_group<kCached>((tid & (per_row - 1)), per_row, shape.groups, [&](uint32_t g, int j) {
            const int n = count(g);
            const int64_t e0 = row * H + 8 * int64_t{g};
            Group<T> dy;
            Group<R> s;
            load_row(p, e0, n, kVector, dy, s);
            const Group<C> w = load_parameters<C>(p.weight, g, n, shape.parameter_vector);
            if constexpr (kCached) {
              st.dy[j] = dy;
              st.s[j] = s;
              st.keep[j] = group_bits<S, kVector>(p.bits, seed, offset, row, e0, row * H + H, n);
            }
            C dz[8], dzz[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
              dz[k] = norm::mul_rn(dy.get(k), w.get(k));
              dzz[k] = norm::mul_rn(dz[k], norm::normalized(s.get(k), st.mean, st.rstd));
            }
            accumulate(acc_a, n, [&](int k) { return dz[k]; });
            accumulate(acc_b, n, [&](int k) { return dzz[k]; });
          });
        }
        sh.a[tid] = norm::fold_group(acc_a);
        sh.b[tid] = norm::fold_group(acc_b);
      });
      b.sync();
      halve_rows(b, per_row, sh.a, sh.b);

      // The gradients of the row, and its parameter-gradient terms.
      b.each([&](uint32_t tid, State& st) {
        const int64_t row = batch + (tid >> shape.thread_shift);
        st.a = shape.layer ? norm::row_mean(sh.a[tid & ~(per_row - 1)], inverse_hidden) : C(0);
        st.b = norm::row_mean(sh.b[tid & ~(per_row - 1)], inverse_hidden);
        if (row >= end) return;
        const C scale = compute_as<C>(p.scale_f, p.scale_d);
        for_each_group<kCached>((tid & (per_row - 1)), per_row, shape.groups, [&](uint32_t g, int j) {
          const int n = count(g);
          const int64_t e0 = row * H + 8 * int64_t{g};
          constexpr bool vector = kVector;
          Group<T> dy;
          Group<R> s;
          uint32_t keep;
          if constexpr (kCached) {
            dy = st.dy[j];
            s = st.s[j];
            keep = st.keep[j];
          } else {
            load_row(p, e0, n, vector, dy, s);
            keep = group_bits<S, kVector>(p.bits, seed, offset, row, e0, row * H + H, n);
          }
          const Group<C> w = load_parameters<C>(p.weight, g, n, shape.parameter_vector);
          Group<R> dro;
          if (p.grad_residual_out != nullptr) {
            dro.load(static_cast<const typename Element<R>::Bits*>(p.grad_residual_out) + e0, n, vector);
          }
          Group<R> dr;
          Group<T> dx;
          C term[kTerms][8];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            C ds_pair[2], dx_pair[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int e = 2 * k + h;
              const C z = norm::normalized(s.get(e), st.mean, st.rstd);
              C ds = norm::sum_gradient(norm::mul_rn(dy.get(e), w.get(e)), z, st.a, st.b, st.rstd);
              if (p.grad_residual_out != nullptr) ds = norm::add_rn(ds, dro.get(e));
              const C d = (keep >> e) & 1u ? norm::mul_rn(ds, scale) : C(0);
              ds_pair[h] = stored<R>(ds);
              dx_pair[h] = stored<T>(d);
              term[0][e] = norm::mul_rn(dy.get(e), z);
              term[1][e] = dy.get(e);
              term[2][e] = d;
            }
            dr.set_pair(k, ds_pair[0], ds_pair[1]);
            dx.set_pair(k, dx_pair[0], dx_pair[1]);
          }
          if (p.grad_residual != nullptr) store_group(dr, static_cast<typename Element<R>::Bits*>(p.grad_residual) + e0, n, vector);
          store_group(dx, static_cast<typename Element<T>::Bits*>(p.grad_input) + e0, n, vector);
          if (!terms) return;
          // The three terms' sums: this thread's registers, or its slot's lane in global memory.
          C* sums;
          int64_t stride;
          if constexpr (kCached) {
            sums = st.terms + j * 8;
            stride = 8 * kRowGroupsPerThread;
          } else {
            sums = lane_sums + lane_index(p, 0, chunk, tid >> shape.thread_shift) + 8 * int64_t{g};
            stride = lane_index(p, 1, 0, 0);
          }
          accumulate(sums, n, [&](int k) { return term[0][k]; });
          accumulate(sums + stride, n, [&](int k) { return term[1][k]; });
          accumulate(sums + 2 * stride, n, [&](int k) { return term[2][k]; });
        });
      });
      b.sync();
    }
    if (terms) fold_slots(p, chunk, b, sh);
  }

  // Where slot `slot`'s sums of term q lie in lane_sums (streamed kernels):
  // [3][chunks][slots][8 * groups].
  REGDROP_HOST_DEVICE static int64_t lane_index(const NormBackwardParams& p, int q, uint32_t chunk, uint32_t slot) {
    return ((static_cast<int64_t>(q) * p.chunks + chunk) * p.shape.slots + slot) * 8 * int64_t{p.shape.groups};
  }

  REGDROP_HOST_DEVICE static void load_row(const NormBackwardParams& p, int64_t e0, int n, bool vector, Group<T>& dy,
                                           Group<R>& s) {
    dy.load(static_cast<const typename Element<T>::Bits*>(p.grad_output) + e0, n, vector);
    s.load(static_cast<const typename Element<R>::Bits*>(p.residual_out) + e0, n, vector);
  }

  // The slots' sums (lanes of the plan) of each parameter term, folded in
  // slot order into the chunk's partial sums: from registers through
  // shared memory a tile of columns at a time, or from global memory.
  template <class Block>
  REGDROP_HOST_DEVICE static void fold_slots(const NormBackwardParams& p, uint32_t chunk, Block& b, Shared& sh) {
    const RowShape& shape = p.shape;
    const uint32_t per_row = shape.threads;
    const int64_t H = shape.hidden;
    C* const partial = static_cast<C*>(p.partial);
    if constexpr (!kCached) {
      const C* lane_sums = static_cast<const C*>(p.lane_sums);
      const int64_t width = 8 * int64_t{shape.groups};
      b.each([&](uint32_t tid, State&) {
        for (int q = 0; q < kTerms; ++q) {
          const C* lanes = lane_sums + lane_index(p, q, chunk, 0);
          for (int64_t c = tid; c < H; c += kRowBlockThreads) {
            C sum = 0;
            for (uint32_t slot = 0; slot < shape.slots; ++slot) sum = norm::add_rn(sum, lanes[slot * width + c]);
            partial[(q * p.chunks + chunk) * H + c] = sum;
          }
        }
      });
    } else {
      const int64_t tile = int64_t{kFoldTile / kRowBlockThreads} << shape.thread_shift;  // columns per tile: kFoldTile / slots
#pragma unroll
      for (int q = 0; q < kTerms; ++q) {
        for (int64_t col0 = 0; col0 < H; col0 += tile) {
          b.each([&](uint32_t tid, State& st) {
            const uint32_t slot = tid >> shape.thread_shift;
            for_each_group<true>((tid & (per_row - 1)), per_row, shape.groups, [&](uint32_t g, int j) {
#pragma unroll
              for (int k = 0; k < 8; ++k) {
                const int64_t col = 8 * int64_t{g} + k;
                if (col >= col0 && col < col0 + tile && col < H) {
                  sh.fold[slot * tile + (col - col0)] = st.terms[(q * kRowGroupsPerThread + j) * 8 + k];
                }
              }
            });
          });
          b.sync();
          b.each([&](uint32_t tid, State&) {
            for (int64_t c = tid; c < tile && col0 + c < H; c += kRowBlockThreads) {
              C sum = 0;
              for (uint32_t slot = 0; slot < shape.slots; ++slot) sum = norm::add_rn(sum, sh.fold[slot * tile + c]);
              partial[(q * p.chunks + chunk) * H + col0 + c] = sum;
            }
          });
          b.sync();
        }
      }
    }
  }
};

}  // namespace regdrop::cuda
