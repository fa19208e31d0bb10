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

// The backward's plan, in one list that generates the struct here and its field names for the emulator's C
// API (tests/simt reads them from the library, so no second copy can drift). Every field is int64_t.
//   block_m         query rows per block of the scores kernel (S, dP, softmax backward, dQ; writes P and dS)
//   keys_padded     S rounded up to 16: the row length of P and dS in the workspace
//   key_dim_padded, value_dim_padded   Dk, Dv rounded up to 16: the columns of the fp32 partials
//   chunks          query chunks the key/value GEMM [dK|dV] = [dS|P]^T [q|dO] is split into
//   rows_per_chunk  queries per chunk (a multiple of 64)
//   dscore_offset, partial_offset      byte offsets in the workspace of dS and of the partials (P is at 0)
//   workspace_bytes bytes the caller allocates (no initialisation, 256-byte aligned)
//   smem_bytes      dynamic shared memory of the scores kernel
#define ANNK_ATTENTION_BACKWARD_PLAN_FIELDS(X)                                                         \
  X(block_m) X(keys_padded) X(key_dim_padded) X(value_dim_padded) X(chunks) X(rows_per_chunk) X(dscore_offset) \
      X(partial_offset) X(workspace_bytes) X(smem_bytes)

struct AttentionBackwardPlan {
#define ANNK_PLAN_FIELD(name) int64_t name;
  ANNK_ATTENTION_BACKWARD_PLAN_FIELDS(ANNK_PLAN_FIELD)
#undef ANNK_PLAN_FIELD
};

// Fills *plan for the current device. Returns cudaErrorInvalidValue for unsupported shapes.
cudaError_t short_attention_backward_plan(DType dtype, const AttentionShape& shape, AttentionBackwardPlan* plan);

// Gradients of short_attention_forward, in three launches: the scores kernel, the key/value GEMM split over
// the queries (fp32 partials per chunk), and a reduce that adds the chunks in a fixed order, so every gradient
// is bitwise reproducible. The softmax statistics are recomputed from the score rows in shared memory (not
// rebuilt from the forward's logsumexp), so P matches the forward's bit for bit. Each gradient may have any
// strides.
cudaError_t short_attention_backward(DType dtype, const AttentionShape& shape, ConstView3 grad_out, ConstView3 query,
                                     ConstView3 key, ConstView3 value, float scale, View3 grad_query,
                                     View3 grad_key, View3 grad_value,
                                     const AttentionBackwardPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace annkernels
