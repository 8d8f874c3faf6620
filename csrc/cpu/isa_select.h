// Which copy of a CPU kernel set runs: the one for the widest instruction set
// both this CPU and PyTorch use. Follows at::get_cpu_capability(), which
// honours ATEN_CPU_CAPABILITY, so one environment variable selects PyTorch's
// kernels and regdrop's together.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace regdrop::cpu {

template <class Set>
const Set& select_isa(const Set& baseline, const Set& avx2, const Set& avx512) {
#if defined(__x86_64__)
  const std::string capability = at::get_cpu_capability();
  __builtin_cpu_init();
  if (capability == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return avx512;
  }
  if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return avx2;
  }
#else
  (void)avx2;
  (void)avx512;
#endif
  return baseline;
}

}  // namespace regdrop::cpu
