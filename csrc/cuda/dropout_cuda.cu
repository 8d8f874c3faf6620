// CUDA kernels of the dropout family (see kernel_call.h for the axes).
//
// Layout: elements in memory order, grouped by 8; group g owns mask byte g.
// Launch: one thread per group (256 threads per block for 2-byte types, 512
// otherwise), no grid-stride loop. A thread
//   1. gets its group's 8 keep bits: one Philox4x32-10 call (all 128 bits
//      used), or the mask byte, or its elements' unit bits;
//   2. loads its 8 elements with 128-bit loads when every pointer is 16-byte
//      aligned (scalar loads otherwise, and for the last, partial group);
//   3. writes the epilogue of each element and, when drawing, the mask byte.
// Bias gradients use a second, column-per-thread kernel (bias_grad_kernel).
//
// Philox seeds come from at::PhiloxCudaState through PhiloxSource: under CUDA
// graph capture they are read from device memory when the kernel runs, so
// each replay draws a new mask.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../dropout_ops.h"
#include "../epilogue.h"

namespace regdrop::cuda {
namespace {

template <class T>
struct ComputeType {  // half types compute in float
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

constexpr int kGroup = kUnitsPerGroup;

// 8 elements through 16-byte loads and stores: 1, 2 or 4 of them.
template <class T>
struct alignas(16) Pack {
  T v[kGroup];
};

template <class T>
__device__ __forceinline__ void load_group(const T* p, int n, bool vector, Pack<T>& out) {
  if (vector && n == kGroup) {
    const uint4* src = reinterpret_cast<const uint4*>(p);
    uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
    for (int i = 0; i < int(sizeof(Pack<T>) / 16); ++i) dst[i] = src[i];
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) out.v[j] = j < n ? p[j] : T(0);
  }
}

template <class T>
__device__ __forceinline__ void store_group(T* p, int n, bool vector, const Pack<T>& in) {
  if (vector && n == kGroup) {
    uint4* dst = reinterpret_cast<uint4*>(p);
    const uint4* src = reinterpret_cast<const uint4*>(&in);
#pragma unroll
    for (int i = 0; i < int(sizeof(Pack<T>) / 16); ++i) dst[i] = src[i];
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (j < n) p[j] = in.v[j];
    }
  }
}

__device__ __forceinline__ uint32_t bit_at(const uint8_t* bits, int64_t i) {
  return (bits[i >> 3] >> (i & 7)) & 1u;
}

// Bits of elements e0 .. e0 + n - 1 taken from their units' bits: the
// UnitLayout formula once, then stepped element by element.
__device__ uint32_t unit_bits(const UnitLayout& u, const uint8_t* mask, int64_t e0, int n) {
  int64_t block = e0 / u.block;
  int64_t in_block = e0 - block * u.block;
  const int64_t run = in_block / u.inner;
  int64_t in_run = in_block - run * u.inner;
  int64_t channel = run % u.channels;
  uint32_t bits = 0;
  for (int j = 0; j < n; ++j) {
    bits |= bit_at(mask, block * u.channels + channel) << j;
    if (++in_run == u.inner) {
      in_run = 0;
      if (++channel == u.channels) channel = 0;
    }
    if (++in_block == u.block) {
      in_block = 0;
      in_run = 0;
      channel = 0;
      ++block;
    }
  }
  return bits;
}

template <class T, Epilogue E, MaskSource S>
__global__ void dropout_kernel(KernelCall c, int64_t groups, bool vector) {
  using C = typename ComputeType<T>::type;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint64_t seed = 0, offset = 0;
  if constexpr (S == MaskSource::Draw) {
    c.rng.unpack(seed, offset);
    if (g == 0 && c.rng_state_out != nullptr) {
      c.rng_state_out[0] = static_cast<int64_t>(seed);
      c.rng_state_out[1] = static_cast<int64_t>(offset);
    }
  }
  if (g >= groups) return;
  const int64_t e0 = g * kGroup;
  const int n = static_cast<int>(min(static_cast<int64_t>(kGroup), c.numel - e0));
  const uint32_t valid = (1u << n) - 1;

  uint32_t bits;
  if constexpr (S == MaskSource::Draw) {
    bits = group_keep_bits(seed, offset, static_cast<uint64_t>(g), c.threshold) & valid;
    if (c.mask_out != nullptr) c.mask_out[g] = static_cast<uint8_t>(bits);
  } else if constexpr (S == MaskSource::Elements) {
    bits = c.mask_in[g];
  } else {
    bits = unit_bits(c.units, c.mask_in, e0, n);
  }
  if (c.out == nullptr) return;  // only the mask was asked for

  Pack<T> x, r, y;
  load_group(static_cast<const T*>(c.in) + e0, n, vector, x);
  if constexpr (E != Epilogue::Scale) {
    load_group(static_cast<const T*>(c.residual) + e0, n, vector, r);
  }
  const C scale = static_cast<C>(c.scale);
  int64_t col = 0;
  if constexpr (E == Epilogue::AddBiasResidual) col = e0 % c.bias_len;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    C rv = 0, bv = 0;
    if constexpr (E != Epilogue::Scale) rv = static_cast<C>(r.v[j]);
    if constexpr (E == Epilogue::AddBiasResidual) {
      bv = static_cast<C>(static_cast<const T*>(c.bias)[col]);
      if (++col == c.bias_len) col = 0;
    }
    const C kept = kept_value<E>(static_cast<C>(x.v[j]), rv, bv, scale);
    y.v[j] = static_cast<T>(((bits >> j) & 1u) ? kept : dropped_value<E>(rv));
  }
  store_group(static_cast<T*>(c.out) + e0, n, vector, y);
}

// Bias gradient of bias_dropout_add: grad_input = keep ? grad * s : 0 for a
// (rows, bias_len) tensor, and the column sums of grad_input. Thread
// (x, y) of a 32 x 8 block owns one column and every (8 * gridDim.y)-th row
// from its own; each block writes its column sums to one row of `partial`.
template <class T>
__global__ void bias_grad_kernel(KernelCall c, int64_t rows,
                                 typename ComputeType<T>::type* partial) {
  using C = typename ComputeType<T>::type;
  __shared__ C sums[8][32];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const T* grad = static_cast<const T*>(c.in);
  T* out = static_cast<T*>(c.out);
  const C scale = static_cast<C>(c.scale);
  C acc = 0;
  if (col < c.bias_len) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * 8 + threadIdx.y; row < rows;
         row += static_cast<int64_t>(gridDim.y) * 8) {
      const int64_t i = row * c.bias_len + col;
      const C value = bit_at(c.mask_in, i) ? static_cast<C>(grad[i]) * scale : C(0);
      out[i] = static_cast<T>(value);
      acc += value;
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < c.bias_len) {
    C total = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += sums[k][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * c.bias_len + col] = total;
  }
}

// Sums the rows of `partial` in a fixed order (deterministic bias gradients).
template <class C>
__global__ void sum_rows_kernel(const C* partial, int64_t rows, int64_t cols, C* out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  C total = 0;
  for (int64_t k = 0; k < rows; ++k) total += partial[k * cols + col];
  out[col] = total;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
void launch_bias_grad(const KernelCall& c, cudaStream_t stream) {
  using C = typename ComputeType<T>::type;
  const int64_t rows = c.numel / c.bias_len;
  const int64_t column_blocks = (c.bias_len + 31) / 32;
  // Enough row blocks to fill the GPU, few enough that `partial` stays small.
  const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>((rows + 63) / 64, 1024 / column_blocks + 1));
  at::Tensor partial = at::empty({row_blocks, c.bias_len},
                                 at::TensorOptions().device(at::kCUDA, c10::cuda::current_device())
                                     .dtype(sizeof(C) == 8 ? at::kDouble : at::kFloat));
  C* partial_ptr = static_cast<C*>(partial.mutable_data_ptr());
  bias_grad_kernel<T><<<dim3(column_blocks, row_blocks), dim3(32, 8), 0, stream>>>(c, rows, partial_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_rows_kernel<C><<<(c.bias_len + 255) / 256, 256, 0, stream>>>(partial_ptr, row_blocks, c.bias_len,
                                                                  static_cast<C*>(c.bias_grad));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void launch(const KernelCall& c, cudaStream_t stream) {
  if (c.bias_grad != nullptr) return launch_bias_grad<T>(c, stream);
  const int64_t groups = mask_bytes(c.numel);
  const int threads = sizeof(T) == 2 ? 256 : 512;
  const int64_t blocks = (groups + threads - 1) / threads;
  const bool vector = aligned16(c.in) && aligned16(c.out) &&
                      (c.residual == nullptr || aligned16(c.residual));
  auto go = [&](auto epilogue, auto source) {
    dropout_kernel<T, decltype(epilogue)::value, decltype(source)::value>
        <<<blocks, threads, 0, stream>>>(c, groups, vector);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto with_source = [&](auto epilogue) {
    switch (c.source) {
      case MaskSource::Draw:
        return go(epilogue, std::integral_constant<MaskSource, MaskSource::Draw>{});
      case MaskSource::Elements:
        return go(epilogue, std::integral_constant<MaskSource, MaskSource::Elements>{});
      case MaskSource::Units:
        return go(epilogue, std::integral_constant<MaskSource, MaskSource::Units>{});
    }
  };
  switch (c.epilogue) {
    case Epilogue::Scale:
      return with_source(std::integral_constant<Epilogue, Epilogue::Scale>{});
    case Epilogue::AddResidual:
      return with_source(std::integral_constant<Epilogue, Epilogue::AddResidual>{});
    case Epilogue::AddBiasResidual:
      return with_source(std::integral_constant<Epilogue, Epilogue::AddBiasResidual>{});
  }
}

}  // namespace

struct CudaBackend {
  // A graph-safe Philox state from PyTorch's CUDA generator. Each call asks
  // for an offset increment of 4 (PyTorch keeps offsets multiples of 4); the
  // offset lives in counter words 2-3, so calls never share a stream.
  static PhiloxSource generator_source(const std::optional<at::Generator>& generator,
                                       at::Device device) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
    at::PhiloxCudaState state;
    {
      std::lock_guard<std::mutex> lock(gen->mutex_);
      state = gen->philox_cuda_state(4);
    }
    PhiloxSource source;
    if (state.captured_) {
      source.seed_ptr = state.seed_.ptr;
      source.offset_ptr = state.offset_.ptr;
      source.offset_increment = state.offset_intragraph_;
    } else {
      source.seed = state.seed_.val;
      source.offset = state.offset_.val;
    }
    return source;
  }

  static void run(const KernelCall& c) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (c.dtype) {
      case ScalarKind::Float:
        return launch<float>(c, stream);
      case ScalarKind::Double:
        return launch<double>(c, stream);
      case ScalarKind::Half:
        return launch<c10::Half>(c, stream);
      case ScalarKind::BFloat16:
        return launch<c10::BFloat16>(c, stream);
    }
  }
};

}  // namespace regdrop::cuda

TORCH_LIBRARY_IMPL(regdrop, CUDA, m) { regdrop::register_ops<regdrop::cuda::CudaBackend>(m); }
