// Provisional registration of the norm family, until the op manifest takes
// it in: the schemas (norm_schemas.h) as a fragment of the regdrop library,
// and the op bodies on the Meta key, where they allocate outputs and run
// nothing (so fake tensors and torch.compile see the real op's shapes,
// dtypes and checks). The CPU and CUDA kernels are registered at the end of
// cpu/norm_cpu.cpp and cuda/norm_backend.cpp, autograd in norm_autograd.cpp.
#include "norm_ops.h"
#include "norm_schemas.h"

namespace regdrop::norm {
namespace {

// The op bodies return before they would draw or run on meta tensors.
struct MetaNormBackend {
  static constexpr bool kHostMemory = false;
  static PhiloxSource generator_source(const std::optional<at::Generator>&, at::Device) { return {}; }
  static void run_norm_forward(const NormForwardCall&) {}
  static void run_norm_backward(const NormBackwardCall&) {}
};

}  // namespace
}  // namespace regdrop::norm

TORCH_LIBRARY_FRAGMENT(regdrop, m) { regdrop::norm::define_norm_ops(m); }

TORCH_LIBRARY_IMPL(regdrop, Meta, m) { regdrop::norm::register_norm_ops<regdrop::norm::MetaNormBackend>(m); }
