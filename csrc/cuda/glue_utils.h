// Helpers shared by the torch glue of the CUDA kernels (pyramid_pool_cuda.cpp, short_attention_cuda.cpp):
// map tensors onto the torch-free launcher types and turn launcher errors into Python exceptions.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "launch_types.h"

namespace annkernels {

inline cuda_kernels::DType kernel_dtype(const at::Tensor& t, bool allow_double) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda_kernels::DType::kFloat32;
    case at::kHalf:
      return cuda_kernels::DType::kFloat16;
    case at::kBFloat16:
      return cuda_kernels::DType::kBFloat16;
    case at::kDouble:
      if (allow_double) {
        return cuda_kernels::DType::kFloat64;
      }
      break;
    default:
      break;
  }
  TORCH_CHECK(false, "unsupported dtype ", t.scalar_type(), " for the CUDA kernel; expected float32, float16 or bfloat16",
              allow_double ? " or float64" : "");
}

inline cuda_kernels::ConstView3 const_view3(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

inline cuda_kernels::View3 view3(const at::Tensor& t) {
  return {t.mutable_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

}  // namespace annkernels

// Launchers return cudaError_t; report the failing op and CUDA's reason.
#define ANNK_CHECK_CUDA_STATUS(status, op) \
  TORCH_CHECK((status) == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(status))
