// Raw-pointer launchers for the fused short-key attention kernels (torch-free; see short_attention.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "launch_types.h"

namespace annkernels {
namespace cuda_kernels {

// A whole score row (S keys, padded to a multiple of 16) lives in shared memory.
constexpr int64_t kMaxAttentionKeys = 1024;

// query [batch, queries, key_dim], key [batch, keys, key_dim], value [batch, keys, value_dim].
struct AttentionShape {
  int64_t batch;
  int64_t queries;
  int64_t keys;
  int64_t key_dim;
  int64_t value_dim;
};

// out [batch, queries, value_dim] (any strides) = softmax(q k^T * scale) v; logsumexp [batch, queries]
// contiguous fp32. Supports kFloat32 (3xTF32 tensor-core products, ~fp32 accuracy), kFloat16, kBFloat16.
cudaError_t short_attention_forward(DType dtype, const AttentionShape& shape, ConstView3 query, ConstView3 key,
                                    ConstView3 value, float scale, View3 out, float* logsumexp,
                                    cudaStream_t stream);

// How the backward splits the queries: each of chunks_per_batch blocks per batch handles query tiles of
// block_m rows and keeps its dK/dV partial sums in its own workspace slot; a second kernel adds the
// slots in a fixed order. The caller allocates workspace_floats fp32 elements (no initialisation).
struct AttentionBackwardPlan {
  int block_m;
  int64_t chunks_per_batch;
  int64_t keys_padded;
  int64_t key_dim_padded;
  int64_t value_dim_padded;
  int64_t workspace_floats;
  size_t smem_bytes;
};

// Fills *plan for the current device. Returns cudaErrorInvalidValue for unsupported shapes.
cudaError_t short_attention_backward_plan(DType dtype, const AttentionShape& shape, AttentionBackwardPlan* plan);

// Gradients of short_attention_forward. The softmax statistics are recomputed from the score rows in shared
// memory (not rebuilt from the forward's logsumexp), so P matches the forward's bit for bit. Each gradient
// may have any strides.
cudaError_t short_attention_backward(DType dtype, const AttentionShape& shape, ConstView3 grad_out, ConstView3 query,
                                     ConstView3 key, ConstView3 value, float scale, View3 grad_query,
                                     View3 grad_key, View3 grad_value,
                                     const AttentionBackwardPlan& plan, float* workspace, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace annkernels
