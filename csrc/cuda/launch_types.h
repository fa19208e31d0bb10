// Plain types shared by the raw-pointer launchers and the torch glue. No CUDA or torch headers,
// so both nvcc-only translation units and the glue can include it.
#pragma once

#include <cstdint>

namespace annkernels {
namespace cuda_kernels {

// Element type of every tensor handed to one launch (the glue maps at::ScalarType onto it).
enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// A [batch, rows, cols] operand: base pointer plus element strides of each dimension.
struct ConstView3 {
  const void* data;
  int64_t batch_stride;
  int64_t row_stride;
  int64_t col_stride;
};
struct View3 {
  void* data;
  int64_t batch_stride;
  int64_t row_stride;
  int64_t col_stride;
};

}  // namespace cuda_kernels
}  // namespace annkernels
