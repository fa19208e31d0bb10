// Device helpers shared by the annkernels CUDA kernels. CUDA headers only: no torch, so every .cu
// file compiles with plain nvcc and the kernels can be checked on machines without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch_types.h"

namespace annkernels {
namespace cuda_kernels {

constexpr int kWarpSize = 32;

// Storage type <-> accumulation type. fp16/bf16 accumulate in fp32, fp32 in fp32, fp64 in fp64.
template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T>
__device__ __forceinline__ T from_acc(double x);
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// PyTorch's adaptive-average-pool bin i of `bins` over an axis of `length`:
// [floor(i * length / bins), ceil((i + 1) * length / bins)). Neighbouring bins may share one element,
// and when bins > length an element can sit in several bins.
__host__ __device__ __forceinline__ int adaptive_bin_start(int i, int length, int bins) {
  return static_cast<int>((static_cast<int64_t>(i) * length) / bins);
}
__host__ __device__ __forceinline__ int adaptive_bin_end(int i, int length, int bins) {
  return static_cast<int>(ceil_div(static_cast<int64_t>(i + 1) * length, bins));
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The one mapping from a launch's DType to its storage type: returns launch(TypeTag<T>{}), or
// cudaErrorInvalidValue for a dtype the kernels do not take (float64 unless kWithDouble).
template <bool kWithDouble, typename Launch>
cudaError_t dispatch_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32:
      return launch(TypeTag<float>{});
    case DType::kFloat16:
      return launch(TypeTag<__half>{});
    case DType::kBFloat16:
      return launch(TypeTag<__nv_bfloat16>{});
    case DType::kFloat64:
      if constexpr (kWithDouble) {
        return launch(TypeTag<double>{});
      }
      break;
  }
  return cudaErrorInvalidValue;
}

#if defined(__CUDACC__)
// cudaLaunchKernel with each argument converted to the kernel's own parameter type first (TypeTag<P>::type
// takes no part in deduction), so the argument array it copies from matches the kernel's signature.
template <typename... Params>
cudaError_t launch_converted(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             typename TypeTag<Params>::type... params) {
  void* arguments[] = {static_cast<void*>(&params)...};
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, arguments, smem, stream);
}
#endif

// Every kernel launch goes through here. Under nvcc it is cudaLaunchKernel, whose status is this launch's
// own (cudaGetLastError() after <<<...>>> could report an error left by an earlier, unrelated kernel); when
// g++ compiles these sources against the CPU SIMT emulator (tests/simt), the emulator runs the grid.
template <auto Kernel, typename... Args>
cudaError_t launch_kernel(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
#if defined(__CUDACC__)
  return launch_converted(Kernel, grid, block, smem, stream, args...);
#else
  (void)stream;
  return simt::launch_kernel(__PRETTY_FUNCTION__, Kernel, grid, block, smem, args...);
#endif
}

// Launches that need more than the default 48 KiB of dynamic shared memory must opt in first.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  constexpr size_t kDefaultLimit = 48 * 1024;
  if (bytes <= kDefaultLimit) {
    return cudaSuccess;
  }
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace cuda_kernels
}  // namespace annkernels
