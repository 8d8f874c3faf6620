// Linking regdrop_ext::regdrop registers the ops, although this program calls
// no symbol of the library and is linked with --as-needed (CMakeLists.txt):
// the manifest and the API are headers.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/op_registration/infer_schema.h>
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

// The difference between function `fn` of regdrop.h and its op's schema, or
// nullopt. find_op makes the same check on a function's first call; this
// makes it for every function without calling any.
#define REGDROP_SIGNATURE_DIFFERENCE(fn)                                                   \
  c10::findSchemaDifferences(c10::inferFunctionSchemaFlattenedReturns<decltype(regdrop::fn)>(), \
                             c10::Dispatcher::singleton().findSchemaOrThrow("regdrop::" #fn, "").schema())
#define EXPECT_MATCHES_SCHEMA(fn) \
  EXPECT_FALSE(REGDROP_SIGNATURE_DIFFERENCE(fn).has_value()) << #fn ": " << REGDROP_SIGNATURE_DIFFERENCE(fn).value_or("");

TEST(Registration, TheApiTypesEveryOpAsItsSchema) {
#define EXPECT_FORWARD(name, unit, operands, in_place, low_memory) \
  EXPECT_MATCHES_SCHEMA(name)                                      \
  REGDROP_IF_##in_place(EXPECT_MATCHES_SCHEMA(name##_)) REGDROP_IF_##low_memory(EXPECT_MATCHES_SCHEMA(name##_low_memory))
#define EXPECT_BACKWARD(name, unit, gradients, saved) EXPECT_MATCHES_SCHEMA(name)
#define EXPECT_NORM(name, kind) EXPECT_MATCHES_SCHEMA(name)
  REGDROP_FORWARD_OPS(EXPECT_FORWARD)
  REGDROP_BACKWARD_OPS(EXPECT_BACKWARD)
  REGDROP_NORM_OPS(EXPECT_NORM)
#undef EXPECT_FORWARD
#undef EXPECT_BACKWARD
#undef EXPECT_NORM
}

}  // namespace
