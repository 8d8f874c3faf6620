// Linking regdrop_ext::regdrop registers the ops, although this program calls
// no symbol of the library and is linked with --as-needed (CMakeLists.txt).
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <set>
#include <string>

namespace {

// The ops of csrc/schemas.h, each with a function in regdrop/regdrop.h.
const std::set<std::string> kOps = {
    "regdrop::dropout",
    "regdrop::dropout_",
    "regdrop::dropout_backward",
    "regdrop::dropout_add",
    "regdrop::bias_dropout_add",
    "regdrop::bias_dropout_add_backward",
    "regdrop::channel_dropout",
    "regdrop::channel_dropout_",
    "regdrop::channel_dropout_backward",
    "regdrop::drop_path",
    "regdrop::drop_path_add",
    "regdrop::drop_path_backward",
    "regdrop::dropout_low_memory",
    "regdrop::dropout_add_low_memory",
    "regdrop::dropout_low_memory_backward",
};

TEST(Registration, OpsAreInTheDispatcherWithAKernelPerDevice) {
  for (const std::string& name : kOps) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    ASSERT_TRUE(op.has_value()) << name << " is not registered";
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) << name;
#ifdef REGDROP_WITH_CUDA
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) << name;
#endif
  }
}

TEST(Registration, EveryRegisteredOpHasAnApiFunction) {
  for (const c10::OperatorName& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("regdrop::", 0) == 0) {
      EXPECT_EQ(kOps.count(name.name), 1u) << name.name << " has no function in regdrop/regdrop.h";
    }
  }
}

}  // namespace
