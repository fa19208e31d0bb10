// Torch glue for the CUDA short-key attention kernels: argument checks, output layouts, workspace,
// stream, registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "annkernels/checks.h"
#include "glue_utils.h"
#include "short_attention.h"

namespace annkernels {
namespace {

// Shapes shared by forward and backward: query [B, N, Dk], key [B, S, Dk], value [B, S, Dv], checked, plus
// the CUDA kernels' own limits.
cuda_kernels::AttentionShape kernel_shape(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  TORCH_CHECK(query.is_cuda(), "query must be a CUDA tensor, got device ", query.device());
  check_attention_inputs(query, key, value, query.device());
  kernel_dtype(query, /*allow_double=*/false);
  const int64_t batch = query.size(0), queries = query.size(1), key_dim = query.size(2);
  const int64_t keys = key.size(1), value_dim = value.size(2);
  TORCH_CHECK(keys <= cuda_kernels::kMaxAttentionKeys, "key: the CUDA kernel supports at most ",
              cuda_kernels::kMaxAttentionKeys, " keys (S = key.size(1)), got ", keys);
  TORCH_CHECK(batch <= 65535, "query: the CUDA kernel supports batch <= 65535, got ", batch);
  TORCH_CHECK(queries <= INT32_MAX && key_dim <= INT32_MAX && value_dim <= INT32_MAX,
              "query/value: sizes must be < 2^31 for the CUDA kernel");
  return {batch, queries, keys, key_dim, value_dim};
}

void check_same_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> short_attention_forward_cuda(const at::Tensor& query, const at::Tensor& key,
                                                                const at::Tensor& value, double scale) {
  const auto shape = kernel_shape(query, key, value);
  const auto dtype = kernel_dtype(query, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = empty_like_layout(query, shape.batch, shape.queries, shape.value_dim, query.scalar_type());
  at::Tensor logsumexp = at::empty({shape.batch, shape.queries}, query.options().dtype(at::kFloat));
  const cudaError_t status = cuda_kernels::short_attention_forward(
      dtype, shape, const_view3(query), const_view3(key), const_view3(value), static_cast<float>(scale),
      view3(out), logsumexp.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  ANNK_CHECK_CUDA_STATUS(status, "short_attention_forward");
  return {out, logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> short_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, double scale) {
  const auto shape = kernel_shape(query, key, value);
  const auto dtype = kernel_dtype(query, /*allow_double=*/false);
  check_attention_grad_out(grad_out, out, query, value);
  // The kernel takes sum_j P_j dP_j from its fp32 tile instead of rowsum(grad_out * out), and recomputes the
  // softmax statistics from the score rows; out and logsumexp are only validated so the op keeps the same
  // contract on every backend.
  check_same_shape(logsumexp, "logsumexp", {shape.batch, shape.queries}, query);
  TORCH_CHECK(logsumexp.scalar_type() == at::kFloat, "logsumexp must be float32, got ", logsumexp.scalar_type());

  const c10::cuda::CUDAGuard guard(query.device());
  cuda_kernels::AttentionBackwardPlan plan{};
  cudaError_t status = cuda_kernels::short_attention_backward_plan(dtype, shape, &plan);
  ANNK_CHECK_CUDA_STATUS(status, "short_attention_backward (planning; S too large for shared memory?)");

  at::Tensor grad_query = empty_like_layout(query, shape.batch, shape.queries, shape.key_dim, query.scalar_type());
  at::Tensor grad_key = empty_like_layout(key, shape.batch, shape.keys, shape.key_dim, query.scalar_type());
  at::Tensor grad_value = empty_like_layout(value, shape.batch, shape.keys, shape.value_dim, query.scalar_type());
  at::Tensor workspace = at::empty({plan.workspace_bytes}, query.options().dtype(at::kByte));
  status = cuda_kernels::short_attention_backward(
      dtype, shape, const_view3(grad_out), const_view3(query), const_view3(key), const_view3(value),
      static_cast<float>(scale), view3(grad_query), view3(grad_key), view3(grad_value),
      plan, workspace.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  ANNK_CHECK_CUDA_STATUS(status, "short_attention_backward");
  return {grad_query, grad_key, grad_value};
}

}  // namespace
}  // namespace annkernels

TORCH_LIBRARY_IMPL(annkernels, CUDA, m) {
  m.impl("_short_attention_forward", &annkernels::short_attention_forward_cuda);
  m.impl("_short_attention_backward", &annkernels::short_attention_backward_cuda);
}
