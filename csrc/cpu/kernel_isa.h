// The copies of the CPU kernel family, one per instruction set, and the
// headers kernels.h needs, which must be read before any `#pragma GCC target`
// so that nothing they define is compiled for a wider instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../epilogue.h"
#include "../kernel_call.h"
#include "../philox.h"

namespace regdrop::cpu {

using RunGroupsFn = void (*)(const KernelCall& call, int64_t group_begin, int64_t group_end,
                             void* bias_grad);

namespace baseline {
void run_groups(const KernelCall&, int64_t, int64_t, void*);
}
#if defined(__x86_64__)
namespace avx2 {
void run_groups(const KernelCall&, int64_t, int64_t, void*);
}
namespace avx512 {
void run_groups(const KernelCall&, int64_t, int64_t, void*);
}
#endif

}  // namespace regdrop::cpu
