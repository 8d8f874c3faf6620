// The copies of the CPU kernel family, one per instruction set, and the
// headers kernels.h needs, which must be read before any `#pragma GCC target`
// so that nothing they define is compiled for a wider instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>  // mincore
#include <unistd.h>    // sysconf
#endif

#include "../column_sums.h"
#include "../epilogue.h"
#include "../kernel_call.h"
#include "../philox.h"
#include "lane_masks.h"

namespace regdrop::cpu {

// Chunks [chunk_begin, chunk_end) of columns [col_begin, col_end) of a bias
// gradient (column_sums.h).
struct ColumnRange {
  int64_t chunk_begin, chunk_end;
  int64_t col_begin, col_end;

  bool whole_rows(const ColumnSumPlan& plan) const { return col_begin == 0 && col_end == plan.cols; }
};

// The most accumulators a thread adds a bias gradient's rows into, one per
// lane and column: 256 KB of floats, which stay in L2.
constexpr int64_t kSumSlots = 65536;

// The columns a range's rows are read in at a time: whole rows where their
// lanes' accumulators fit, else blocks of them.
inline int64_t column_block(const ColumnSumPlan& plan, const ColumnRange& range) {
  if (range.whole_rows(plan) && plan.lanes * plan.cols <= kSumSlots) return plan.cols;
  return std::min(range.col_end - range.col_begin, std::max<int64_t>(64, kSumSlots / plan.lanes / 64 * 64));
}

// The accumulators column_sums needs for a range: a block's lanes, a vector
// of slack, and the block's sums over chunks.
inline int64_t column_sum_slots(const ColumnSumPlan& plan, const ColumnRange& range) {
  const int64_t block = column_block(plan, range);
  return (plan.lanes + 1) * block + 64;
}

// What each copy provides:
//   run_groups   groups [begin, end) of an element-wise call;
//   column_sums  a range of a bias gradient: its chunks' sums into `partial`
//                (chunks x cols accumulators), or, with partial == nullptr
//                and every chunk in the range, the result; `scratch` holds
//                column_sum_slots() accumulators;
//   fold_chunks  columns [begin, end) of a bias gradient, from the chunks' sums.
struct KernelSet {
  void (*run_groups)(const KernelCall& call, int64_t group_begin, int64_t group_end);
  void (*column_sums)(const KernelCall& call, const ColumnSumPlan& plan, const ColumnRange& range, void* partial,
                      void* scratch);
  void (*fold_chunks)(const KernelCall& call, const ColumnSumPlan& plan, const void* partial,
                      int64_t col_begin, int64_t col_end);
};

#define REGDROP_DECLARE_KERNEL_SET(isa)                                                        \
  namespace isa {                                                                               \
  void run_groups(const KernelCall&, int64_t, int64_t);                                         \
  void column_sums(const KernelCall&, const ColumnSumPlan&, const ColumnRange&, void*, void*);  \
  void fold_chunks(const KernelCall&, const ColumnSumPlan&, const void*, int64_t, int64_t);     \
  inline constexpr KernelSet kernels{run_groups, column_sums, fold_chunks};                     \
  }

REGDROP_DECLARE_KERNEL_SET(baseline)
#if defined(__x86_64__)
REGDROP_DECLARE_KERNEL_SET(avx2)
REGDROP_DECLARE_KERNEL_SET(avx512)
#endif
#undef REGDROP_DECLARE_KERNEL_SET

}  // namespace regdrop::cpu
