// The copies of the CPU norm kernels (norm_kernels.h), one per instruction
// set, and the headers they need, which must be read before any
// `#pragma GCC target` so that nothing they define is compiled for a wider
// instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../cuda/primitives.h"  // the host's 16-bit conversions, as the CUDA bodies round
#include "../norm/norm_call.h"
#include "../norm/row_math.h"
#include "../norm/row_order.h"
#include "../philox.h"
#include "kernel_isa.h"

namespace regdrop::cpu {

// What each copy provides:
//   forward_rows   rows [begin, end) of a forward call;
//   backward_rows  rows [begin, end) of a backward call, whose bits are read
//                  (drawn ahead), never drawn; with lane_sums, the
//                  rows' parameter-gradient terms added into lane
//                  (row - begin) % lanes of lane_sums, laid out as
//                  [3: weight, bias, input_bias][lanes][8 * ceil(hidden / 8)]
//                  of the compute type (rows begin .. end are one chunk of
//                  the column plan, row_order.h).
struct NormKernelSet {
  void (*forward_rows)(const norm::NormForwardCall& call, int64_t row_begin, int64_t row_end);
  void (*backward_rows)(const norm::NormBackwardCall& call, int64_t row_begin, int64_t row_end, uint32_t lanes,
                        void* lane_sums);
};

#define REGDROP_DECLARE_NORM_KERNEL_SET(isa)                                                         \
  namespace isa {                                                                                     \
  void norm_forward_rows(const norm::NormForwardCall&, int64_t, int64_t);                             \
  void norm_backward_rows(const norm::NormBackwardCall&, int64_t, int64_t, uint32_t, void*);          \
  inline constexpr NormKernelSet norm_kernels{norm_forward_rows, norm_backward_rows};                 \
  }

REGDROP_DECLARE_NORM_KERNEL_SET(baseline)
#if defined(__x86_64__)
REGDROP_DECLARE_NORM_KERNEL_SET(avx2)
REGDROP_DECLARE_NORM_KERNEL_SET(avx512)
#endif
#undef REGDROP_DECLARE_NORM_KERNEL_SET

}  // namespace regdrop::cpu
