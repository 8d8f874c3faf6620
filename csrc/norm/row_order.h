// The order in which the norm family adds, fixed by the shape alone, so that
// the CPU kernels (every instruction set, every thread count) and the CUDA
// kernels (whatever the launch) give the same bits: statistics, outputs and
// gradients.
//
// Within a row of H elements (a mean, a variance, a backward row sum):
//   T = threads_per_row(H), a power of two; L = 8T lanes.
//   1. lane l (< L) adds the elements c = l, l + L, l + 2L, ... of the row
//      in that order, starting from +0;
//   2. each run of 8 lanes 8t .. 8t + 7 (a "thread") is folded by
//      fold_group(): a[k] += a[k + 4] (k < 4), a[k] += a[k + 2] (k < 2),
//      a[0] += a[1];
//   3. the T thread sums p[t] are folded by halving: for h = T/2, T/4, .., 1:
//      p[t] += p[t + h] for t < h. The row's sum is p[0].
// On the GPU, T threads hold a row; thread t loads the 8-element groups t,
// t + T, t + 2T, ... (coalesced 128-bit loads), keeps the 8 lane sums of
// step 1 in registers, folds them (step 2) and halves across threads in
// shared memory (step 3). On the CPU, lanes are vectors: step 1 is vertical
// vector adds over runs of L elements, and steps 2 and 3 fold the L sums
// (cpu/norm_kernels.h, fold_lanes).
//
// Across rows (the weight, norm-bias and input-bias gradients): the order of
// column_sums.h, fold over chunks of fold over lanes of fold over rows, with
// the plan norm_column_plan() gives: lanes = the rows a 256-thread CUDA block
// holds at once, chunks sized so that the chunks' partial sums stay small
// (at most 2^20 per gradient) while there are enough of them to keep a GPU
// busy. Each is added in float (double for float64) and rounded once.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../column_sums.h"
#include "row_math.h"

namespace regdrop::norm {

constexpr int64_t kRowBlockThreads = 256;     // threads of a CUDA block of the row kernels
constexpr int64_t kRowGroupsPerThread = 4;    // groups of 8 a thread holds in registers
constexpr int64_t kMinRowsPerLane = 4;        // rows each lane of a chunk adds, at least
constexpr int64_t kPartialSums = int64_t{1} << 20;  // chunk sums per gradient, at most

inline int64_t row_groups(int64_t hidden) { return (hidden + 7) / 8; }

// T: a power of two, from 1 (rows of up to 32 elements) to 256 (rows of
// more than 4096), with at most kRowGroupsPerThread groups per thread up to
// 8192 elements.
inline uint32_t threads_per_row(int64_t hidden) {
  const int64_t wanted = (row_groups(hidden) + kRowGroupsPerThread - 1) / kRowGroupsPerThread;
  uint32_t t = 1;
  while (t < wanted && t < kRowBlockThreads) t *= 2;
  return t;
}

// Rows a block holds at once, one per T threads: the lanes of the column sums.
inline uint32_t rows_per_block(int64_t hidden) {
  return static_cast<uint32_t>(kRowBlockThreads / threads_per_row(hidden));
}

// Step 2: the 8 lane sums of one thread, folded.
template <class C>
REGDROP_HOST_DEVICE C fold_group(const C* a) {
  const C b0 = add_rn(a[0], a[4]), b1 = add_rn(a[1], a[5]);
  const C b2 = add_rn(a[2], a[6]), b3 = add_rn(a[3], a[7]);
  return add_rn(add_rn(b0, b2), add_rn(b1, b3));
}

// The across-row order of a (rows, hidden) call's parameter gradients, as a
// column_sums.h plan (only rows, cols, lanes, chunk_rows and chunks are used).
inline ColumnSumPlan norm_column_plan(int64_t rows, int64_t hidden) {
  ColumnSumPlan plan;
  plan.rows = rows;
  plan.cols = hidden;
  plan.lanes = rows_per_block(hidden);
  plan.tiles = 1;
  if (rows == 0 || hidden == 0) return plan;
  const int64_t lanes = plan.lanes;
  const int64_t wanted = (rows + lanes * kMinRowsPerLane - 1) / (lanes * kMinRowsPerLane);
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, kPartialSums / hidden));
  plan.chunk_rows = ((rows + chunks - 1) / chunks + lanes - 1) / lanes * lanes;
  plan.chunks = (rows + plan.chunk_rows - 1) / plan.chunk_rows;
  return plan;
}

}  // namespace regdrop::norm
