// Linking regdrop_ext::regdrop registers the ops, although this program calls
// no symbol of the library and is linked with --as-needed (CMakeLists.txt):
// the manifest and the API are headers.
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <regdrop/manifest.h>
#include <regdrop/regdrop.h>

#include <set>
#include <string>

namespace {

std::set<std::string> manifest_ops() {
  std::set<std::string> names;
  for (const regdrop::OpSpec& op : regdrop::kOps) names.insert(std::string("regdrop::") + op.name);
  return names;
}

TEST(Registration, EveryOpOfTheManifestHasAKernelPerDeviceAndAMetaKernel) {
  for (const std::string& name : manifest_ops()) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    ASSERT_TRUE(op.has_value()) << name << " is not registered";
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) << name;
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::Meta)) << name;
#ifdef REGDROP_WITH_CUDA
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) << name;
#endif
  }
}

TEST(Registration, EveryRegisteredOpIsInTheManifest) {
  const std::set<std::string> declared = manifest_ops();
  for (const c10::OperatorName& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("regdrop::", 0) == 0) {
      EXPECT_EQ(declared.count(name.name), 1u) << name.name << " is registered but not in the manifest";
    }
  }
}

TEST(Registration, TheApiTypesEveryOpAsItsSchema) {
  // Each function of regdrop.h checks its signature against the op's schema
  // the first time it is called (TypedOperatorHandle); the norm family's are
  // written out, so call them once.
  const at::Tensor x = at::ones({2, 8});
  const auto [out, residual_out, mask, mean, rstd] =
      regdrop::dropout_add_norm(x, x, std::nullopt, std::nullopt, 0.5, 1e-5, false, std::nullopt, false, true, false,
                                std::nullopt, /*seed=*/1);
  regdrop::dropout_add_norm_backward(out, std::nullopt, residual_out, mask, mean, rstd, std::nullopt, 0.5);
  const auto low = regdrop::dropout_add_norm_low_memory(x, x, std::nullopt, std::nullopt, 0.5, 1e-5, true);
  regdrop::dropout_add_norm_low_memory_backward(std::get<0>(low), std::nullopt, std::get<1>(low), std::get<2>(low),
                                                std::get<3>(low), std::get<4>(low), std::nullopt, 0.5, true);
}

}  // namespace
