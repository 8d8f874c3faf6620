// ColumnSumPlan (csrc/column_sums.h): the bias gradient's summation order,
// which also sizes its temporary memory. For shapes from one row to one
// column and past 2^31 elements: chunks cover the rows, lanes divide
// chunks, blocks stay within 256 threads, and the chunk sums (the only
// temporary) stay within a tile's worth beyond one row: O(tile), whatever
// the shape.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "../../csrc/column_sums.h"

namespace {

TEST(ColumnSumPlan, CoversEveryRowWithBoundedTemporaryMemory) {
  const std::vector<int64_t> sizes = {1, 2, 3, 7, 8, 9, 31, 33, 64, 255, 256, 257, 1000, 4096, 1 << 16, 1 << 20,
                                      1 << 24, int64_t{1} << 31};
  const int64_t bound = regdrop::kColumnSumTargetBlocks * 8 * regdrop::kColumnSumThreads;
  for (int64_t rows : sizes) {
    for (int64_t cols : sizes) {
      if (rows * cols > (int64_t{1} << 36)) continue;
      const auto plan = regdrop::ColumnSumPlan::make(rows, cols);
      SCOPED_TRACE(::testing::Message() << rows << " x " << cols);
      EXPECT_GE(plan.lanes, 1u);
      EXPECT_LE(plan.lanes, rows);
      EXPECT_LE(int64_t{plan.lanes} * plan.column_groups, regdrop::kColumnSumThreads);
      EXPECT_EQ(plan.chunk_rows % plan.lanes, 0);
      EXPECT_GE(plan.chunks * plan.chunk_rows, rows);
      EXPECT_LT((plan.chunks - 1) * plan.chunk_rows, rows);
      EXPECT_GE(plan.tiles * 8 * plan.column_groups, cols);
      EXPECT_LT((plan.tiles - 1) * 8 * plan.column_groups, cols);
      const int64_t temporary = plan.chunks > 1 ? plan.chunks * cols : 0;
      EXPECT_LE(temporary, bound + cols);
    }
  }
}

}  // namespace
