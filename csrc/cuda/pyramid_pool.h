// Raw-pointer launchers for the pyramid pooling kernels (torch-free; see pyramid_pool.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_types.h"

namespace annkernels {
namespace cuda_kernels {

constexpr int kMaxPyramidScales = 16;
// Bins per plane (S = sum of s * s) the kernels keep in shared memory.
constexpr int64_t kMaxPyramidBins = 4096;

struct PyramidScales {
  int count;
  int sizes[kMaxPyramidScales];
};

// One feature map of a forward launch: input [batch, channels, height, width] with element strides
// `strides` (any layout), output [batch, channels, S] contiguous.
struct PoolMap {
  const void* input;
  int64_t channels;
  int64_t strides[4];
  void* output;
};
// APNB and AFNB pool two maps of one source (the key map and the value source) together.
constexpr int kMaxPoolMaps = 2;

// Pools maps[0 .. map_count) in one launch; they share dtype, batch, height and width (channels and layout may
// differ). Bins in scale order, each bin row-major (i * s + j).
// Supports kFloat32, kFloat16, kBFloat16 (fp32 sums) and kFloat64 (fp64 sums).
cudaError_t pyramid_pool_forward(DType dtype, const PoolMap* maps, int map_count, int64_t batch, int64_t height,
                                 int64_t width, const PyramidScales& scales, cudaStream_t stream);

// One map of a backward launch: grad_output [batch, channels, S] (any strides) -> grad_input
// [batch, channels, height, width] contiguous.
struct PoolMapGrad {
  ConstView3 grad_output;
  int64_t channels;
  void* grad_input;
};

// The backward of maps[0 .. map_count) in one launch (dtype, batch, height and width shared). Each pixel gathers
// grad / area over every bin containing it; written once, no atomics.
cudaError_t pyramid_pool_backward(DType dtype, const PoolMapGrad* maps, int map_count, int64_t batch,
                                  const PyramidScales& scales, int64_t height, int64_t width, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace annkernels
