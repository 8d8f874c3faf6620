// The copies of the CPU kernel family, one per instruction set, and the
// headers kernels.h needs, which must be read before any `#pragma GCC target`
// so that nothing they define is compiled for a wider instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../column_sums.h"
#include "../epilogue.h"
#include "../kernel_call.h"
#include "../philox.h"

namespace regdrop::cpu {

// Chunks [chunk_begin, chunk_end) of columns [col_begin, col_end) of a bias
// gradient (column_sums.h).
struct ColumnRange {
  int64_t chunk_begin, chunk_end;
  int64_t col_begin, col_end;
};

// What each copy provides:
//   run_groups   groups [begin, end) of an element-wise call;
//   column_sums  a range of a bias gradient: its chunks' sums into `partial`
//                (chunks x cols accumulators), or, with partial == nullptr
//                and every chunk in the range, the result;
//   fold_chunks  columns [begin, end) of a bias gradient, from the chunks' sums.
struct KernelSet {
  void (*run_groups)(const KernelCall& call, int64_t group_begin, int64_t group_end);
  void (*column_sums)(const KernelCall& call, const ColumnSumPlan& plan, const ColumnRange& range, void* partial);
  void (*fold_chunks)(const KernelCall& call, const ColumnSumPlan& plan, const void* partial,
                      int64_t col_begin, int64_t col_end);
};

#define REGDROP_DECLARE_KERNEL_SET(isa)                                                        \
  namespace isa {                                                                               \
  void run_groups(const KernelCall&, int64_t, int64_t);                                         \
  void column_sums(const KernelCall&, const ColumnSumPlan&, const ColumnRange&, void*);         \
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
