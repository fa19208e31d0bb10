// Torch glue for the CUDA pyramid pooling kernels: argument checks, allocation, stream, registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <vector>

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

// Pools `inputs` (one or two maps of one batch and size) in one launch.
std::vector<at::Tensor> pyramid_pool_cuda(std::initializer_list<const at::Tensor*> inputs, c10::IntArrayRef scales) {
  const at::Tensor& first = **inputs.begin();
  const auto dtype = kernel_dtype(first, /*allow_double=*/true);
  const auto kernel_scale_list = kernel_scales(scales);
  const int64_t batch = first.size(0), height = first.size(2), width = first.size(3);
  check_extent(height, "input.size(2)");
  check_extent(width, "input.size(3)");

  const c10::cuda::CUDAGuard guard(first.device());
  std::vector<at::Tensor> outputs;
  std::vector<cuda_kernels::PoolMap> maps;
  for (const at::Tensor* input : inputs) {
    const int64_t channels = input->size(1);
    check_extent(channels, "input.size(1)");
    check_extent(batch * channels, "input.size(0) * input.size(1)");
    outputs.push_back(at::empty({batch, channels, pyramid_size(scales)}, input->options()));
    maps.push_back({input->const_data_ptr(), channels,
                    {input->stride(0), input->stride(1), input->stride(2), input->stride(3)},
                    outputs.back().mutable_data_ptr()});
  }
  const cudaError_t status =
      cuda_kernels::pyramid_pool_forward(dtype, maps.data(), static_cast<int>(maps.size()), batch, height, width,
                                         kernel_scale_list, c10::cuda::getCurrentCUDAStream());
  ANNK_CHECK_CUDA_STATUS(status, "pyramid_pool_forward");
  return outputs;
}

at::Tensor pyramid_pool_forward_cuda(const at::Tensor& input, c10::IntArrayRef scales) {
  ANNK_CHECK_DIM(input, 4);
  ANNK_CHECK_NONEMPTY(input);
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got device ", input.device());
  return pyramid_pool_cuda({&input}, scales)[0];
}

std::tuple<at::Tensor, at::Tensor> pyramid_pool_pair_forward_cuda(const at::Tensor& first, const at::Tensor& second,
                                                                  c10::IntArrayRef scales) {
  check_pyramid_pair_inputs(first, second);
  TORCH_CHECK(first.is_cuda(), "first must be a CUDA tensor, got device ", first.device());
  auto outputs = pyramid_pool_cuda({&first, &second}, scales);
  return {outputs[0], outputs[1]};
}

// The backward of `grads` (one or two maps of one batch) in one launch.
std::vector<at::Tensor> pyramid_pool_grad_cuda(std::initializer_list<const at::Tensor*> grads, c10::IntArrayRef scales,
                                               int64_t height, int64_t width) {
  const at::Tensor& first = **grads.begin();
  const auto dtype = kernel_dtype(first, /*allow_double=*/true);
  const auto kernel_scale_list = kernel_scales(scales);
  const int64_t batch = first.size(0);
  check_extent(height, "height");
  check_extent(width, "width");

  const c10::cuda::CUDAGuard guard(first.device());
  std::vector<at::Tensor> grad_inputs;
  std::vector<cuda_kernels::PoolMapGrad> maps;
  for (const at::Tensor* grad : grads) {
    const int64_t channels = grad->size(1);
    check_extent(batch * channels, "grad_output.size(0) * grad_output.size(1)");
    grad_inputs.push_back(at::empty({batch, channels, height, width}, grad->options()));
    maps.push_back({const_view3(*grad), channels, grad_inputs.back().mutable_data_ptr()});
  }
  const cudaError_t status =
      cuda_kernels::pyramid_pool_backward(dtype, maps.data(), static_cast<int>(maps.size()), batch, kernel_scale_list,
                                          height, width, c10::cuda::getCurrentCUDAStream());
  ANNK_CHECK_CUDA_STATUS(status, "pyramid_pool_backward");
  return grad_inputs;
}

at::Tensor pyramid_pool_backward_cuda(const at::Tensor& grad_output, c10::IntArrayRef scales, int64_t height,
                                      int64_t width) {
  TORCH_CHECK(grad_output.is_cuda(), "grad_output must be a CUDA tensor, got device ", grad_output.device());
  check_pyramid_backward_inputs(grad_output, scales, height, width, grad_output.device());
  return pyramid_pool_grad_cuda({&grad_output}, scales, height, width)[0];
}

std::tuple<at::Tensor, at::Tensor> pyramid_pool_pair_backward_cuda(const at::Tensor& grad_first,
                                                                   const at::Tensor& grad_second,
                                                                   c10::IntArrayRef scales, int64_t height,
                                                                   int64_t width) {
  TORCH_CHECK(grad_first.is_cuda(), "grad_first must be a CUDA tensor, got device ", grad_first.device());
  check_pyramid_pair_backward_inputs(grad_first, grad_second, scales, height, width);
  auto grad_inputs = pyramid_pool_grad_cuda({&grad_first, &grad_second}, scales, height, width);
  return {grad_inputs[0], grad_inputs[1]};
}

}  // namespace
}  // namespace annkernels

TORCH_LIBRARY_IMPL(annkernels, CUDA, m) {
  m.impl("_pyramid_pool_forward", &annkernels::pyramid_pool_forward_cuda);
  m.impl("_pyramid_pool_pair_forward", &annkernels::pyramid_pool_pair_forward_cuda);
  m.impl("_pyramid_pool_backward", &annkernels::pyramid_pool_backward_cuda);
  m.impl("_pyramid_pool_pair_backward", &annkernels::pyramid_pool_pair_backward_cuda);
}
