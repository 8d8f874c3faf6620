// What a kernel writes for one element: kept_value() where the element is
// kept, dropped_value() where it is dropped. Shared by the CPU kernels (V a
// GCC vector, one value per lane, selected with a bit mask) and the CUDA
// kernels (V a scalar, selected with `keep ? kept : dropped`).
//
// Dropped elements are selected, never multiplied by zero: a dropped NaN or
// Inf becomes exactly 0 (or exactly the residual), so the output agrees with
// the mask bits and p == 1 can never produce 0 * inf.
//
// Every product and sum is rounded on its own (rounding.h), so both devices
// give the bits of IEEE arithmetic rounded at each step.
#pragma once

#include "kernel_call.h"
#include "rounding.h"

namespace regdrop {

template <Epilogue E, class V>
REGDROP_HOST_DEVICE V kept_value(V x, V residual, V bias, V scale) {
  if constexpr (E == Epilogue::Scale) {
    return mul_rn(x, scale);
  } else if constexpr (E == Epilogue::AddResidual) {
    return add_rn(residual, mul_rn(x, scale));
  } else {
    return add_rn(residual, mul_rn(add_rn(x, bias), scale));
  }
}

template <Epilogue E, class V>
REGDROP_HOST_DEVICE V dropped_value(V residual) {
  if constexpr (E == Epilogue::Scale) {
    return V{};
  } else {
    return residual;
  }
}

}  // namespace regdrop
