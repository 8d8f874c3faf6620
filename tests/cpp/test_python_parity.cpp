// The C++ library and the Python build draw the same masks for the same
// seed and offset. Both register the regdrop namespace, so they cannot share
// a process: python_masks.py runs in the interpreter given by the CMake cache
// variable REGDROP_PYTHON_EXECUTABLE (the test is skipped without one).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <regdrop/regdrop.h>

#include <cstdio>
#include <iomanip>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr int64_t kMaxInt64 = std::numeric_limits<int64_t>::max();

struct Case {
  int64_t seed;
  int64_t offset;
  int64_t numel;
  double p;
};

std::string hex(const at::Tensor& mask) {
  std::ostringstream out;
  out << std::hex << std::setfill('0');
  const uint8_t* bytes = mask.data_ptr<uint8_t>();
  for (int64_t i = 0; i < mask.numel(); ++i) out << std::setw(2) << int{bytes[i]};
  return out.str();
}

// One line of output of python_masks.py per case.
std::vector<std::string> python_masks(const std::vector<Case>& cases) {
  std::ostringstream command;
  command << '"' << REGDROP_PYTHON_EXECUTABLE << "\" \"" << REGDROP_PYTHON_MASKS_SCRIPT << '"'
          << std::setprecision(17);
  for (const Case& c : cases) {
    command << ' ' << c.seed << ' ' << c.offset << ' ' << c.numel << ' ' << c.p;
  }
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.str().c_str(), "r"), pclose);
  std::string output;
  char buffer[4096];
  for (size_t n; pipe && (n = std::fread(buffer, 1, sizeof buffer, pipe.get())) > 0;) {
    output.append(buffer, n);
  }
  std::vector<std::string> lines;
  std::istringstream stream(output);
  for (std::string line; std::getline(stream, line);) lines.push_back(line);
  return lines;
}

TEST(PythonParity, MasksEqualThoseOfThePythonBuild) {
  if (std::string(REGDROP_PYTHON_EXECUTABLE).empty()) {
    GTEST_SKIP() << "no Python to compare with: configure with -DREGDROP_PYTHON_EXECUTABLE=<python "
                    "with regdrop_ext installed>";
  }
  const std::vector<Case> cases = {
      {0, 0, 1, 0.5},
      {7, 0, 1003, 0.1},
      {-1, 12, 4099, 0.5},
      {123456789, (int64_t{1} << 32) - 4, 65, 0.97},
      {42, int64_t{1} << 40, 100003, 0.3},
      {kMaxInt64, kMaxInt64 - 3, 77, 0.5},
  };
  const std::vector<std::string> expected = python_masks(cases);
  ASSERT_EQ(expected.size(), cases.size()) << "python_masks.py failed (its error output is above)";
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const at::Tensor mask =
        std::get<1>(regdrop::dropout(at::ones({c.numel}), c.p, std::nullopt, c.seed, c.offset));
    EXPECT_EQ(hex(mask), expected[i])
        << "seed " << c.seed << ", offset " << c.offset << ", numel " << c.numel;
  }
}

}  // namespace
