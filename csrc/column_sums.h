// The order in which a bias gradient's column sums are added, fixed by the
// shape alone, so that the CPU kernels and the CUDA kernels give the same
// bits, whatever the thread count or the GPU.
//
// For a (rows, cols) gradient, the sum of column c is
//   fold over chunks k (in order) of
//     fold over lanes l < lanes (in order) of
//       fold over the rows r of chunk k with r % lanes == l (ascending) of v[r][c]
// where each fold starts from +0 and adds left to right, in the accumulator
// type (float, or double for float64), and the result is rounded once to
// the gradient's dtype. Chunks are `chunk_rows` consecutive rows (a multiple
// of `lanes`).
//
// The shape of the plan is the CUDA kernel's (thread_bodies.h): a block of
// `column_groups` x `lanes` threads covers 8 * column_groups columns (a tile)
// of one chunk; lanes are summed in shared memory, chunks through a
// chunks x cols buffer. Temporary memory is therefore chunks x cols
// accumulators, and chunks is small where cols is large: at most
// kColumnSumTargetBlocks x 8 x kColumnSumThreads accumulators beyond one row.
#pragma once

#include <algorithm>
#include <cstdint>

namespace regdrop {

constexpr int64_t kColumnSumThreads = 256;        // threads per CUDA block
constexpr int64_t kColumnSumUnroll = 4;           // rows loaded before any is added
constexpr int64_t kColumnSumRowsPerThread = 8;    // at least, per chunk
constexpr int64_t kColumnSumTargetBlocks = 1024;  // enough to fill a GPU

struct ColumnSumPlan {
  int64_t rows = 0;
  int64_t cols = 0;
  uint32_t column_groups = 1;  // groups of 8 columns per tile
  uint32_t lanes = 1;
  int64_t tiles = 0;
  int64_t chunk_rows = 1;
  int64_t chunks = 0;

  static ColumnSumPlan make(int64_t rows, int64_t cols) {
    ColumnSumPlan plan;
    plan.rows = rows;
    plan.cols = cols;
    if (rows == 0 || cols == 0) return plan;
    auto floor_pow2 = [](int64_t n) {
      int64_t p = 1;
      while (2 * p <= n) p *= 2;
      return p;
    };
    const int64_t groups = (cols + 7) / 8;
    // As many column groups as a row has (up to 32, one warp), then as many
    // lanes as fill the block, but no more lanes than rows.
    const int64_t column_groups = std::min<int64_t>(32, groups <= 1 ? 1 : 2 * floor_pow2(groups - 1));
    const int64_t lanes = std::min(kColumnSumThreads / column_groups, floor_pow2(rows));
    plan.column_groups = static_cast<uint32_t>(column_groups);
    plan.lanes = static_cast<uint32_t>(lanes);
    plan.tiles = (cols + 8 * column_groups - 1) / (8 * column_groups);
    // Enough chunks for kColumnSumTargetBlocks blocks, while each thread
    // keeps at least kColumnSumRowsPerThread rows of a chunk.
    const int64_t wanted = (kColumnSumTargetBlocks + plan.tiles - 1) / plan.tiles;
    const int64_t most = std::max<int64_t>(1, rows / (lanes * kColumnSumRowsPerThread));
    const int64_t chunks = std::min(wanted, most);
    plan.chunk_rows = ((rows + chunks - 1) / chunks + lanes - 1) / lanes * lanes;
    plan.chunks = (rows + plan.chunk_rows - 1) / plan.chunk_rows;
    return plan;
  }
};

}  // namespace regdrop
