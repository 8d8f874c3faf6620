// Lane masks from mask bits, looked up: entry b of kLaneMasks<I, W> has all
// ones in lane j where bit j of b is set, else zeros. Without AVX-512's mask
// registers, building one from a byte (broadcast, and, compare) costs four
// vector operations in loops that have a dozen; a lookup costs one load.
// The tables are data, the same for every instruction set: 8 KB for 8
// 32-bit lanes, 16 KB for 8 64-bit ones, a few hundred bytes for 4 or fewer.
#pragma once

#include <cstdint>

namespace regdrop::cpu {

template <class I, int W>
struct LaneMasks {
  alignas(W * sizeof(I) < 64 ? W * sizeof(I) : 64) I lanes[1 << W][W];
  constexpr LaneMasks() : lanes{} {
    for (int b = 0; b < (1 << W); ++b) {
      for (int j = 0; j < W; ++j) lanes[b][j] = (b >> j) & 1 ? I{-1} : I{0};
    }
  }
};

template <class I, int W>
inline constexpr LaneMasks<I, W> kLaneMasks{};

}  // namespace regdrop::cpu
