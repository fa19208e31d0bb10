// Torch glue for the CUDA pyramid pooling kernels: argument checks, allocation, stream, registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "annkernels/checks.h"
#include "glue_utils.h"
#include "pyramid_pool.h"

namespace annkernels {
namespace {

cuda_kernels::PyramidScales kernel_scales(c10::IntArrayRef scales) {
  const int64_t bins = pyramid_size(scales);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) <= cuda_kernels::kMaxPyramidScales,
              "scales: the CUDA kernel supports at most ", cuda_kernels::kMaxPyramidScales, " scales, got ",
              scales.size());
  TORCH_CHECK(bins <= cuda_kernels::kMaxPyramidBins, "scales: the CUDA kernel supports at most ",
              cuda_kernels::kMaxPyramidBins, " bins (sum of s*s), got ", bins);
  cuda_kernels::PyramidScales result{};
  result.count = static_cast<int>(scales.size());
  for (size_t k = 0; k < scales.size(); ++k) {
    result.sizes[k] = static_cast<int>(scales[k]);
  }
  return result;
}

void check_extent(int64_t value, const char* name) {
  TORCH_CHECK(value > 0 && value <= INT32_MAX, name, " must be in [1, 2^31 - 1] for the CUDA kernel, got ", value);
}

at::Tensor pyramid_pool_forward_cuda(const at::Tensor& input, c10::IntArrayRef scales) {
  ANNK_CHECK_DIM(input, 4);
  ANNK_CHECK_NONEMPTY(input);
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got device ", input.device());
  const auto dtype = kernel_dtype(input, /*allow_double=*/true);
  const auto kernel_scale_list = kernel_scales(scales);
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  check_extent(channels, "input.size(1)");
  check_extent(height, "input.size(2)");
  check_extent(width, "input.size(3)");
  check_extent(batch * channels, "input.size(0) * input.size(1)");

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty({batch, channels, pyramid_size(scales)}, input.options());
  const int64_t strides[4] = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  const cudaError_t status = cuda_kernels::pyramid_pool_forward(
      dtype, input.const_data_ptr(), batch, channels, height, width, strides, kernel_scale_list,
      output.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  ANNK_CHECK_CUDA_STATUS(status, "pyramid_pool_forward");
  return output;
}

at::Tensor pyramid_pool_backward_cuda(const at::Tensor& grad_output, c10::IntArrayRef scales, int64_t height,
                                      int64_t width) {
  TORCH_CHECK(grad_output.is_cuda(), "grad_output must be a CUDA tensor, got device ", grad_output.device());
  check_pyramid_backward_inputs(grad_output, scales, height, width, grad_output.device());
  const auto dtype = kernel_dtype(grad_output, /*allow_double=*/true);
  const auto kernel_scale_list = kernel_scales(scales);
  const int64_t batch = grad_output.size(0), channels = grad_output.size(1);
  check_extent(height, "height");
  check_extent(width, "width");
  check_extent(batch * channels, "grad_output.size(0) * grad_output.size(1)");

  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor grad_input = at::empty({batch, channels, height, width}, grad_output.options());
  const cudaError_t status = cuda_kernels::pyramid_pool_backward(
      dtype, const_view3(grad_output), batch, channels, kernel_scale_list, height, width,
      grad_input.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  ANNK_CHECK_CUDA_STATUS(status, "pyramid_pool_backward");
  return grad_input;
}

}  // namespace
}  // namespace annkernels

TORCH_LIBRARY_IMPL(annkernels, CUDA, m) {
  m.impl("_pyramid_pool_forward", &annkernels::pyramid_pool_forward_cuda);
  m.impl("_pyramid_pool_backward", &annkernels::pyramid_pool_backward_cuda);
}
