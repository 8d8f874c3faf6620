// The regdrop op library: its schemas (schemas.h, from the manifest), and its
// meta kernels: the device-generic op bodies (dropout_ops.h, and the norm
// family's norm/norm_ops.h) with a backend that launches nothing. They run for meta tensors and, under torch.compile,
// for fake ones, where they make the real ops' checks and give their
// outputs' shapes, dtypes and strides, from the same code.
#include "dropout_ops.h"
#include "norm/norm_ops.h"
#include "schemas.h"

namespace regdrop {
namespace {

struct MetaBackend {
  static constexpr bool kLaunches = false;
  static PhiloxSource generator_source(const std::optional<at::Generator>&, at::Device) { return {}; }
  static void run(const KernelCall&) {}
  static void run_norm_forward(const norm::NormForwardCall&) {}
  static void run_norm_backward(const norm::NormBackwardCall&) {}
};

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY(regdrop, m) { regdrop::define_ops(m); }

TORCH_LIBRARY_IMPL(regdrop, Meta, m) {
  regdrop::register_ops<regdrop::MetaBackend>(m);
  regdrop::norm::register_norm_ops<regdrop::MetaBackend>(m);
}
