// Fused short-key attention (ANN): softmax(q k^T * scale) v with few keys (S <= 1024), on tensor cores.
//
// A block owns BM query rows and keeps their whole score row (all S keys, padded to a multiple of 16) in
// shared memory, so the N x S matrix never reaches global memory; the forward saves only logsumexp.
// Products run on WMMA: fp16/bf16 inputs use m16n16k16 with fp32 accumulation; fp32 inputs use
// m16n16k8 TF32 with the 3xTF32 split (a*b ~ a_hi*b_hi + a_hi*b_lo + a_lo*b_hi), which keeps close to
// fp32 accuracy instead of TF32's 10-bit mantissa. Softmax statistics are fp32 for every dtype.
//
// Operands are streamed through shared memory in tiles. Loads run threads along whichever operand axis
// has stride 1, so the channel-first views [B, N, D] with stride (D*N, 1, N) are read coalesced along N;
// outputs are staged in fp32 and written the same way.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>

#include "common.cuh"
#include "short_attention.h"

namespace annkernels {
namespace cuda_kernels {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kFragsN = 2;                        // 16-wide column fragments per warp
constexpr int kTileN = kWarps * kFragsN * 16;     // output columns per pass (128)
constexpr int kChunkK = 64;                       // depth per staged tile of Q k^T and dO v^T
constexpr int kChunkS = 64;                       // keys per staged tile of P v and dS k
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Fragment operations per storage type. fp16/bf16: one MMA per product.
template <typename T>
struct Mma {
  static constexpr int kK = 16;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <typename Layout>
  struct A {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout> frag;
  };
  template <typename Layout>
  struct B {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout> frag;
  };
  template <typename Layout>
  static __device__ __forceinline__ void load(A<Layout>& a, const T* ptr, unsigned ld) {
    wmma::load_matrix_sync(a.frag, ptr, ld);
  }
  template <typename Layout>
  static __device__ __forceinline__ void load(B<Layout>& b, const T* ptr, unsigned ld) {
    wmma::load_matrix_sync(b.frag, ptr, ld);
  }
  template <typename LayoutA, typename LayoutB>
  static __device__ __forceinline__ void mma(Acc& acc, const A<LayoutA>& a, const B<LayoutB>& b) {
    wmma::mma_sync(acc, a.frag, b.frag, acc);
  }
};

// fp32: 3xTF32. Each operand is split into a TF32 head and a TF32 tail; the tail*tail term is dropped.
template <>
struct Mma<float> {
  static constexpr int kK = 8;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <typename Layout>
  struct A {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, Layout> hi, lo;
  };
  template <typename Layout>
  struct B {
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, Layout> hi, lo;
  };
  template <typename Frag>
  static __device__ __forceinline__ void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
      const float value = hi.x[i];
      hi.x[i] = wmma::__float_to_tf32(value);
      lo.x[i] = wmma::__float_to_tf32(value - hi.x[i]);
    }
  }
  template <typename Layout>
  static __device__ __forceinline__ void load(A<Layout>& a, const float* ptr, unsigned ld) {
    wmma::load_matrix_sync(a.hi, ptr, ld);
    split(a.hi, a.lo);
  }
  template <typename Layout>
  static __device__ __forceinline__ void load(B<Layout>& b, const float* ptr, unsigned ld) {
    wmma::load_matrix_sync(b.hi, ptr, ld);
    split(b.hi, b.lo);
  }
  template <typename LayoutA, typename LayoutB>
  static __device__ __forceinline__ void mma(Acc& acc, const A<LayoutA>& a, const B<LayoutB>& b) {
    wmma::mma_sync(acc, a.lo, b.hi, acc);
    wmma::mma_sync(acc, a.hi, b.lo, acc);
    wmma::mma_sync(acc, a.hi, b.hi, acc);
  }
};

// Shared-memory row padding: 16 bytes keeps WMMA's ldm rule (multiple of 16 bytes) and staggers banks.
template <typename T>
constexpr int kPad = static_cast<int>(16 / sizeof(T));

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Score rows: fp32, S padded to a multiple of 16, plus 4 floats of padding.
__host__ __device__ constexpr int score_ld(int keys_padded) { return keys_padded + 4; }

template <typename T, int BM>
constexpr size_t stage_bytes() {
  const size_t qk_tiles = static_cast<size_t>(BM + kTileN) * (kChunkK + kPad<T>) * sizeof(T);
  const size_t value_tile = static_cast<size_t>(kChunkS) * (kTileN + kPad<T>) * sizeof(T);
  const size_t out_stage = static_cast<size_t>(std::max(BM * (kTileN + 4), kTileN * (BM + 4))) * sizeof(float);
  const size_t query_tile = static_cast<size_t>(BM) * (kTileN + kPad<T>) * sizeof(T);
  return align128(std::max(std::max(qk_tiles, value_tile), std::max(out_stage, query_tile)));
}

template <typename T, int BM>
constexpr size_t forward_smem_bytes(int keys_padded) {
  return align128(static_cast<size_t>(BM) * score_ld(keys_padded) * sizeof(float)) + stage_bytes<T, BM>();
}

template <typename T, int BM>
constexpr size_t backward_smem_bytes(int keys_padded) {
  return 2 * align128(static_cast<size_t>(BM) * score_ld(keys_padded) * sizeof(float)) + stage_bytes<T, BM>();
}

// Copies a ROWS x COLS tile of a strided global matrix into shared memory (row-major, leading dimension
// ld); entries outside rows x cols are zero, so padded keys, rows and depth add nothing to products.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* __restrict__ src, int64_t row_stride,
                                          int64_t col_stride, int rows, int cols) {
  const bool rows_fastest = row_stride == 1 && col_stride != 1;
  const T zero = from_acc<T>(0.0f);
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
    const int r = rows_fastest ? e % ROWS : e / COLS;
    const int c = rows_fastest ? e / ROWS : e % COLS;
    dst[r * ld + c] = (r < rows && c < cols) ? src[r * row_stride + c * col_stride] : zero;
  }
}

// Writes the valid rows x cols of an fp32 tile staged in shared memory to a strided global matrix.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void store_tile(T* __restrict__ dst, int64_t row_stride, int64_t col_stride,
                                           const float* stage, int ld, bool stage_col_major, int rows, int cols) {
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
    const int r = stage_col_major ? e % ROWS : e / COLS;
    const int c = stage_col_major ? e / ROWS : e % COLS;
    if (r < rows && c < cols) {
      dst[r * row_stride + c * col_stride] = from_acc<T>(stage_col_major ? stage[c * ld + r] : stage[r * ld + c]);
    }
  }
}

// A warp's accumulators in the two tile GEMMs below: all BM rows by its kFragsN 16-column fragments.
template <typename T, int BM>
using WarpAccumulators = typename Mma<T>::Acc[BM / 16][kFragsN];

template <typename T, int BM>
__device__ __forceinline__ void zero_accumulators(WarpAccumulators<T, BM>& acc) {
#pragma unroll
  for (int m = 0; m < BM / 16; ++m) {
#pragma unroll
    for (int f = 0; f < kFragsN; ++f) {
      wmma::fill_fragment(acc[m][f], 0.0f);
    }
  }
}

// One k step (Mma<T>::kK deep) of a warp's row block: acc[m][f] += A[16m, 16m + 16) x B(col_f) for the warp's
// columns col_f = (warp * kFragsN + f) * 16 with n0 + col_f < cols. A is row-major at `a` (already at this k
// step, leading dimension ld_a); load_b(fragment, col) loads B's fragment for column col.
template <typename T, int BM, typename LayoutB, typename LoadB>
__device__ __forceinline__ void mma_k_step(WarpAccumulators<T, BM>& acc, const T* a, int ld_a, int n0, int cols,
                                           LoadB load_b) {
  using M = Mma<T>;
  constexpr int kRowFrags = BM / 16;
  const int warp = threadIdx.x / kWarpSize;
  typename M::template A<wmma::row_major> a_frag[kRowFrags];
#pragma unroll
  for (int m = 0; m < kRowFrags; ++m) {
    M::load(a_frag[m], a + 16 * m * ld_a, ld_a);
  }
#pragma unroll
  for (int f = 0; f < kFragsN; ++f) {
    const int col = (warp * kFragsN + f) * 16;
    if (n0 + col < cols) {
      typename M::template B<LayoutB> b_frag;
      load_b(b_frag, col);
#pragma unroll
      for (int m = 0; m < kRowFrags; ++m) {
        M::mma(acc[m][f], a_frag[m], b_frag);
      }
    }
  }
}

// out[BM x cols_padded] (fp32, shared) = A[BM x depth] * B[b_rows x depth]^T, both operands global.
// A is the block's query tile (a_rows valid), B the keys (b_rows valid); columns b_rows..cols_padded
// come out zero. Warp w owns columns [32w, 32w + 32) of each 128-column pass and all BM rows.
template <typename T, int BM>
__device__ void gemm_abt_to_smem(const T* a, int64_t a_rs, int64_t a_cs, int a_rows, const T* b, int64_t b_rs,
                                 int64_t b_cs, int b_rows, int depth, int cols_padded, float* out, int ld_out,
                                 T* stage) {
  using M = Mma<T>;
  constexpr int kRowFrags = BM / 16;
  constexpr int ld = kChunkK + kPad<T>;
  T* a_tile = stage;
  T* b_tile = stage + BM * ld;
  const int warp = threadIdx.x / kWarpSize;
  for (int n0 = 0; n0 < cols_padded; n0 += kTileN) {
    WarpAccumulators<T, BM> acc;
    zero_accumulators<T, BM>(acc);
    for (int k0 = 0; k0 < depth; k0 += kChunkK) {
      __syncthreads();  // the previous tiles are no longer read
      load_tile<T, BM, kChunkK>(a_tile, ld, a + k0 * a_cs, a_rs, a_cs, a_rows, depth - k0);
      load_tile<T, kTileN, kChunkK>(b_tile, ld, b + n0 * b_rs + k0 * b_cs, b_rs, b_cs, b_rows - n0, depth - k0);
      __syncthreads();
      const int k_end = min(kChunkK, static_cast<int>(round_up(depth - k0, M::kK)));
      for (int kk = 0; kk < k_end; kk += M::kK) {
        mma_k_step<T, BM, wmma::col_major>(acc, a_tile + kk, ld, n0, cols_padded, [&](auto& b_frag, int col) {
          M::load(b_frag, b_tile + col * ld + kk, ld);
        });
      }
    }
#pragma unroll
    for (int f = 0; f < kFragsN; ++f) {
      const int col = (warp * kFragsN + f) * 16;
      if (n0 + col < cols_padded) {
#pragma unroll
        for (int m = 0; m < kRowFrags; ++m) {
          wmma::store_matrix_sync(out + 16 * m * ld_out + n0 + col, acc[m][f], ld_out, wmma::mem_row_major);
        }
      }
    }
  }
}

// out[BM x cols] (global, strided; out_rows valid) = A[BM x depth_padded] * B[b_rows x cols], where A is
// in shared memory (row-major, ld_a) and B global (rows b_rows..depth_padded read as zero).
template <typename T, int BM>
__device__ void gemm_ab_to_global(const T* a, int ld_a, int depth_padded, const T* b, int64_t b_rs, int64_t b_cs,
                                  int b_rows, int cols, T* out, int64_t o_rs, int64_t o_cs, int out_rows, T* stage) {
  using M = Mma<T>;
  constexpr int kRowFrags = BM / 16;
  constexpr int ld_b = kTileN + kPad<T>;
  T* b_tile = stage;
  float* out_stage = reinterpret_cast<float*>(stage);  // reused once the products are done
  const bool stage_col_major = o_rs == 1 && o_cs != 1;
  const int ld_out = stage_col_major ? BM + 4 : kTileN + 4;
  const int warp = threadIdx.x / kWarpSize;
  for (int n0 = 0; n0 < cols; n0 += kTileN) {
    WarpAccumulators<T, BM> acc;
    zero_accumulators<T, BM>(acc);
    for (int k0 = 0; k0 < depth_padded; k0 += kChunkS) {
      __syncthreads();
      load_tile<T, kChunkS, kTileN>(b_tile, ld_b, b + k0 * b_rs + n0 * b_cs, b_rs, b_cs, b_rows - k0, cols - n0);
      __syncthreads();
      const int k_end = min(kChunkS, depth_padded - k0);
      for (int kk = 0; kk < k_end; kk += M::kK) {
        mma_k_step<T, BM, wmma::row_major>(acc, a + k0 + kk, ld_a, n0, cols, [&](auto& b_frag, int col) {
          M::load(b_frag, b_tile + kk * ld_b + col, ld_b);
        });
      }
    }
    __syncthreads();  // b_tile is dead; out_stage overlays it
#pragma unroll
    for (int f = 0; f < kFragsN; ++f) {
      const int col = (warp * kFragsN + f) * 16;
      if (n0 + col < cols) {
#pragma unroll
        for (int m = 0; m < kRowFrags; ++m) {
          if (stage_col_major) {
            wmma::store_matrix_sync(out_stage + col * ld_out + 16 * m, acc[m][f], ld_out, wmma::mem_col_major);
          } else {
            wmma::store_matrix_sync(out_stage + 16 * m * ld_out + col, acc[m][f], ld_out, wmma::mem_row_major);
          }
        }
      }
    }
    __syncthreads();
    store_tile<T, BM, kTileN>(out + n0 * o_cs, o_rs, o_cs, out_stage, ld_out, stage_col_major, out_rows, cols - n0);
  }
}

// Adds A^T * B to this block's fp32 workspace slot W[rows_padded x ld_w] (or overwrites it when `first`):
// A[BM x rows_padded] is in shared memory (row-major, ld_a), B[BM x cols] global (b_rows valid rows).
// Fragments of W are spread over the warps; each warp always gets the same ones, so the accumulation
// order is fixed.
template <typename T, int BM>
__device__ void gemm_atb_to_workspace(const T* a, int ld_a, int rows_padded, const T* b, int64_t b_rs, int64_t b_cs,
                                      int b_rows, int cols, float* w, int ld_w, bool first, T* stage) {
  using M = Mma<T>;
  constexpr int ld_b = kTileN + kPad<T>;
  T* b_tile = stage;
  const int warp = threadIdx.x / kWarpSize;
  for (int n0 = 0; n0 < cols; n0 += kTileN) {
    __syncthreads();
    load_tile<T, BM, kTileN>(b_tile, ld_b, b + n0 * b_cs, b_rs, b_cs, b_rows, cols - n0);
    __syncthreads();
    const int col_frags = min(kTileN, ld_w - n0) / 16;
    const int frags = rows_padded / 16 * col_frags;
    for (int f = warp; f < frags; f += kWarps) {
      const int row_frag = f / col_frags;
      const int col_frag = f % col_frags;
      float* dst = w + 16 * row_frag * ld_w + n0 + 16 * col_frag;
      typename M::Acc acc;
      if (first) {
        wmma::fill_fragment(acc, 0.0f);
      } else {
        wmma::load_matrix_sync(acc, dst, ld_w, wmma::mem_row_major);
      }
#pragma unroll
      for (int kk = 0; kk < BM; kk += M::kK) {
        // A^T as a column-major view of A: element (s, m) is a[m * ld_a + s].
        typename M::template A<wmma::col_major> a_frag;
        typename M::template B<wmma::row_major> b_frag;
        M::load(a_frag, a + kk * ld_a + 16 * row_frag, ld_a);
        M::load(b_frag, b_tile + kk * ld_b + 16 * col_frag, ld_b);
        M::mma(acc, a_frag, b_frag);
      }
      wmma::store_matrix_sync(dst, acc, ld_w, wmma::mem_row_major);
    }
  }
}

// Maximum and sum of exp2(x - maximum) over x = row[j] * scale_log2, j < keys; one warp per row, every lane
// gets both. P_j = exp2(x_j - maximum) / sum: the largest P is exactly 1 when one key dominates, however
// large the scores, which a P rebuilt from the log-sum-exp (about 1e3 for large scores, so its fp32
// rounding shifts every exponent) would not give.
struct RowStats {
  float maximum;
  float sum;
};

__device__ __forceinline__ RowStats row_stats(const float* row, int keys, float scale_log2, int lane) {
  float maximum = -INFINITY;
  for (int j = lane; j < keys; j += kWarpSize) {
    maximum = fmaxf(maximum, row[j] * scale_log2);
  }
  maximum = warp_max(maximum);
  float sum = 0.0f;
  for (int j = lane; j < keys; j += kWarpSize) {
    sum += exp2f(row[j] * scale_log2 - maximum);
  }
  return {maximum, warp_sum(sum)};
}

__device__ __forceinline__ float row_prob(float score, float scale_log2, RowStats stats) {
  return exp2f(score * scale_log2 - stats.maximum) / stats.sum;
}

// Softmax of each scaled score row, in place: row r of `scores` (fp32, ld_s) becomes P in T with the
// same byte offset per row (ld_s * 4 / sizeof(T) elements), keys..keys_padded set to zero. One warp per
// row; P is written 32 entries at a time after the warp has read them, which is safe because entry j
// of P occupies bytes that belong to score entries <= j.
template <typename T, int BM>
__device__ void softmax_rows(float* scores, int ld_s, int keys, int keys_padded, float scale, float* lse,
                             int rows_valid) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int ld_p = ld_s * static_cast<int>(sizeof(float) / sizeof(T));
  const float scale_log2 = scale * kLog2e;
  for (int r = warp; r < BM; r += kWarps) {
    const float* row = scores + r * ld_s;
    T* prob = reinterpret_cast<T*>(scores) + r * ld_p;
    const RowStats stats = row_stats(row, keys, scale_log2, lane);
    if (lane == 0 && r < rows_valid) {
      lse[r] = (stats.maximum + log2f(stats.sum)) * kLn2;
    }
    for (int j0 = 0; j0 < keys_padded; j0 += kWarpSize) {
      const int j = j0 + lane;
      const float p = j < keys ? row_prob(row[j], scale_log2, stats) : 0.0f;
      __syncwarp();
      if (j < keys_padded) {
        prob[j] = from_acc<T>(p);
      }
      __syncwarp();
    }
  }
}

// Backward of the softmax, in place: P (recomputed from the score row exactly as the forward computes it)
// replaces the score row and dS = P * (dP - sum_j P_j dP_j) * scale replaces the dP row (both in T, same
// aliasing as softmax_rows). sum_j P_j dP_j equals rowsum(dO * O) but comes from the fp32 tile, so `out`
// is not read. Rows past the last query get P = dS = 0 and so add nothing to dK and dV.
template <typename T, int BM>
__device__ void softmax_backward_rows(float* scores, float* dprob, int ld_s, int keys, int keys_padded, float scale,
                                      int rows_valid) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int ld_p = ld_s * static_cast<int>(sizeof(float) / sizeof(T));
  const float scale_log2 = scale * kLog2e;
  for (int r = warp; r < BM; r += kWarps) {
    const bool valid = r < rows_valid;
    const float* s_row = scores + r * ld_s;
    const float* dp_row = dprob + r * ld_s;
    T* p_out = reinterpret_cast<T*>(scores) + r * ld_p;
    T* ds_out = reinterpret_cast<T*>(dprob) + r * ld_p;
    const RowStats stats = row_stats(s_row, keys, scale_log2, lane);
    float delta = 0.0f;
    if (valid) {
      for (int j = lane; j < keys; j += kWarpSize) {
        delta += row_prob(s_row[j], scale_log2, stats) * dp_row[j];
      }
    }
    delta = warp_sum(delta);
    for (int j0 = 0; j0 < keys_padded; j0 += kWarpSize) {
      const int j = j0 + lane;
      float p = 0.0f;
      float ds = 0.0f;
      if (valid && j < keys) {
        p = row_prob(s_row[j], scale_log2, stats);
        ds = p * (dp_row[j] - delta) * scale;
      }
      __syncwarp();
      if (j < keys_padded) {
        p_out[j] = from_acc<T>(p);
        ds_out[j] = from_acc<T>(ds);
      }
      __syncwarp();
    }
  }
}

struct ForwardParams {
  ConstView3 query, key, value;
  View3 out;
  float* lse;
  int queries, keys, key_dim, value_dim;
  float scale;
};

// Forward. Grid: (ceil(N / BM), B); 128 threads. Shared: fp32 scores [BM x (S_pad + 4)] (P in place)
// plus one staging area for operand tiles and the fp32 output tile.
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) short_attention_forward_kernel(ForwardParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int keys_padded = static_cast<int>(round_up(p.keys, 16));
  const int ld_s = score_ld(keys_padded);
  float* scores = reinterpret_cast<float*>(smem);
  T* stage = reinterpret_cast<T*>(smem + align128(static_cast<size_t>(BM) * ld_s * sizeof(float)));

  const int b = blockIdx.y;
  const int row0 = blockIdx.x * BM;
  const int rows_valid = min(BM, p.queries - row0);
  const T* query = static_cast<const T*>(p.query.data) + b * p.query.batch_stride + row0 * p.query.row_stride;
  const T* key = static_cast<const T*>(p.key.data) + b * p.key.batch_stride;
  const T* value = static_cast<const T*>(p.value.data) + b * p.value.batch_stride;
  T* out = static_cast<T*>(p.out.data) + b * p.out.batch_stride + row0 * p.out.row_stride;

  gemm_abt_to_smem<T, BM>(query, p.query.row_stride, p.query.col_stride, rows_valid, key, p.key.row_stride,
                          p.key.col_stride, p.keys, p.key_dim, keys_padded, scores, ld_s, stage);
  __syncthreads();
  softmax_rows<T, BM>(scores, ld_s, p.keys, keys_padded, p.scale,
                      p.lse + static_cast<int64_t>(b) * p.queries + row0, rows_valid);
  __syncthreads();
  const int ld_p = ld_s * static_cast<int>(sizeof(float) / sizeof(T));
  gemm_ab_to_global<T, BM>(reinterpret_cast<const T*>(scores), ld_p, keys_padded, value, p.value.row_stride,
                           p.value.col_stride, p.keys, p.value_dim, out, p.out.row_stride, p.out.col_stride,
                           rows_valid, stage);
}

struct BackwardParams {
  ConstView3 grad_out, query, key, value;
  View3 grad_query;
  float* workspace_key;    // [B][chunks][S_pad][Dk_pad]
  float* workspace_value;  // [B][chunks][S_pad][Dv_pad]
  int queries, keys, key_dim, value_dim;
  int key_dim_padded, value_dim_padded;
  float scale;
};

// Backward. Grid: (chunks, B); block x handles query tiles x, x + chunks, ... of BM rows. Per tile:
// scores = q k^T and dP = dO v^T into two fp32 buffers, the softmax backward in place (P, dS*scale in T),
// dQ = dS k written directly, and dK += dS^T q, dV += P^T dO into the block's workspace slot.
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) short_attention_backward_kernel(BackwardParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int keys_padded = static_cast<int>(round_up(p.keys, 16));
  const int ld_s = score_ld(keys_padded);
  const int ld_p = ld_s * static_cast<int>(sizeof(float) / sizeof(T));
  const size_t score_bytes = align128(static_cast<size_t>(BM) * ld_s * sizeof(float));
  float* scores = reinterpret_cast<float*>(smem);
  float* dprob = reinterpret_cast<float*>(smem + score_bytes);
  T* stage = reinterpret_cast<T*>(smem + 2 * score_bytes);

  const int b = blockIdx.y;
  const int64_t slot = static_cast<int64_t>(b) * gridDim.x + blockIdx.x;
  float* ws_key = p.workspace_key + slot * keys_padded * p.key_dim_padded;
  float* ws_value = p.workspace_value + slot * keys_padded * p.value_dim_padded;
  const T* key = static_cast<const T*>(p.key.data) + b * p.key.batch_stride;
  const T* value = static_cast<const T*>(p.value.data) + b * p.value.batch_stride;
  const int tiles = static_cast<int>(ceil_div(p.queries, BM));

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int row0 = tile * BM;
    const int rows_valid = min(BM, p.queries - row0);
    const bool first = tile == static_cast<int>(blockIdx.x);
    const T* query = static_cast<const T*>(p.query.data) + b * p.query.batch_stride + row0 * p.query.row_stride;
    const T* grad_out =
        static_cast<const T*>(p.grad_out.data) + b * p.grad_out.batch_stride + row0 * p.grad_out.row_stride;
    T* grad_query =
        static_cast<T*>(p.grad_query.data) + b * p.grad_query.batch_stride + row0 * p.grad_query.row_stride;

    gemm_abt_to_smem<T, BM>(query, p.query.row_stride, p.query.col_stride, rows_valid, key, p.key.row_stride,
                            p.key.col_stride, p.keys, p.key_dim, keys_padded, scores, ld_s, stage);
    gemm_abt_to_smem<T, BM>(grad_out, p.grad_out.row_stride, p.grad_out.col_stride, rows_valid, value,
                            p.value.row_stride, p.value.col_stride, p.keys, p.value_dim, keys_padded, dprob, ld_s,
                            stage);
    __syncthreads();
    softmax_backward_rows<T, BM>(scores, dprob, ld_s, p.keys, keys_padded, p.scale, rows_valid);
    __syncthreads();
    const T* prob = reinterpret_cast<const T*>(scores);
    const T* dscore = reinterpret_cast<const T*>(dprob);
    gemm_ab_to_global<T, BM>(dscore, ld_p, keys_padded, key, p.key.row_stride, p.key.col_stride, p.keys, p.key_dim,
                             grad_query, p.grad_query.row_stride, p.grad_query.col_stride, rows_valid, stage);
    gemm_atb_to_workspace<T, BM>(dscore, ld_p, keys_padded, query, p.query.row_stride, p.query.col_stride,
                                 rows_valid, p.key_dim, ws_key, p.key_dim_padded, first, stage);
    gemm_atb_to_workspace<T, BM>(prob, ld_p, keys_padded, grad_out, p.grad_out.row_stride, p.grad_out.col_stride,
                                 rows_valid, p.value_dim, ws_value, p.value_dim_padded, first, stage);
    __syncthreads();  // the next tile overwrites the score buffers
  }
}

// dK or dV: out[b, s, d] = sum over chunks c (in order) of workspace[b][c][s][d]. One thread per output
// element, d fastest so the workspace reads are coalesced; fixed order makes the result bitwise
// reproducible.
template <typename T>
__global__ void __launch_bounds__(256)
    reduce_chunks_kernel(const float* __restrict__ workspace, int64_t chunks, int rows, int cols, int rows_padded,
                         int ld, int64_t total, View3 out) {
  T* dst = static_cast<T*>(out.data);
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(index % cols);
    const int s = static_cast<int>((index / cols) % rows);
    const int64_t b = index / (static_cast<int64_t>(cols) * rows);
    const int64_t slot_elems = static_cast<int64_t>(rows_padded) * ld;
    const float* src = workspace + b * chunks * slot_elems + static_cast<int64_t>(s) * ld + d;
    float sum = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      sum += src[c * slot_elems];
    }
    dst[b * out.batch_stride + s * out.row_stride + d * out.col_stride] = from_acc<T>(sum);
  }
}

bool valid_shape(const AttentionShape& shape) {
  constexpr int64_t kIntMax = 0x7fffffff;
  constexpr int64_t kMaxGridY = 65535;
  return shape.batch > 0 && shape.batch <= kMaxGridY && shape.queries > 0 && shape.queries <= kIntMax &&
         shape.keys > 0 && shape.keys <= kMaxAttentionKeys && shape.key_dim > 0 && shape.key_dim <= kIntMax &&
         shape.value_dim > 0 && shape.value_dim <= kIntMax;
}

cudaError_t device_limits(int* sm_count, int* max_smem) {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, device);
  }
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  return status;
}

template <typename T, int BM>
cudaError_t launch_forward_bm(const AttentionShape& shape, const ForwardParams& params, cudaStream_t stream) {
  const int keys_padded = static_cast<int>(round_up(shape.keys, 16));
  const size_t smem = forward_smem_bytes<T, BM>(keys_padded);
  cudaError_t status = allow_dynamic_smem(short_attention_forward_kernel<T, BM>, smem);
  if (status != cudaSuccess) {
    return status;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(shape.queries, BM)), static_cast<unsigned>(shape.batch));
  return launch_kernel<short_attention_forward_kernel<T, BM>>(grid, kThreads, smem, stream, params);
}

// Query tile: 64 rows when the score rows are short and there are enough tiles to give every SM a block,
// else 16 (S up to 1024, or few queries). Only these two are instantiated to keep compile time down.
template <typename T>
int forward_block_m(const AttentionShape& shape, int sm_count, int max_smem) {
  const int keys_padded = static_cast<int>(round_up(shape.keys, 16));
  if (keys_padded <= 256 && forward_smem_bytes<T, 64>(keys_padded) <= static_cast<size_t>(max_smem) &&
      ceil_div(shape.queries, 64) * shape.batch >= sm_count) {
    return 64;
  }
  return forward_smem_bytes<T, 16>(keys_padded) <= static_cast<size_t>(max_smem) ? 16 : 0;
}

template <typename T>
cudaError_t launch_forward(const AttentionShape& shape, const ForwardParams& params, cudaStream_t stream) {
  int sm_count = 0;
  int max_smem = 0;
  cudaError_t status = device_limits(&sm_count, &max_smem);
  if (status != cudaSuccess) {
    return status;
  }
  switch (forward_block_m<T>(shape, sm_count, max_smem)) {
    case 64:
      return launch_forward_bm<T, 64>(shape, params, stream);
    case 16:
      return launch_forward_bm<T, 16>(shape, params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t plan_backward(const AttentionShape& shape, AttentionBackwardPlan* plan) {
  int sm_count = 0;
  int max_smem = 0;
  cudaError_t status = device_limits(&sm_count, &max_smem);
  if (status != cudaSuccess) {
    return status;
  }
  const int keys_padded = static_cast<int>(round_up(shape.keys, 16));
  // Two fp32 score buffers: 64 query rows while they stay near 64 KiB, else 16.
  const int block_m = keys_padded <= 128 ? 64 : 16;
  const size_t smem =
      block_m == 64 ? backward_smem_bytes<T, 64>(keys_padded) : backward_smem_bytes<T, 16>(keys_padded);
  if (smem > static_cast<size_t>(max_smem)) {
    return cudaErrorInvalidValue;
  }
  // Blocks (= workspace slots) in all: enough to occupy every SM, few enough that the fp32 partials
  // (slots x S_pad x (Dk + Dv) floats, written and read once) stay small. Untuned: measure on a GPU.
  constexpr int kBackwardBlocksPerSm = 2;
  const int64_t tiles = ceil_div(shape.queries, block_m);
  const int64_t chunks =
      std::min<int64_t>(tiles, std::max<int64_t>(1, ceil_div(kBackwardBlocksPerSm * sm_count, shape.batch)));
  plan->block_m = block_m;
  plan->chunks_per_batch = chunks;
  plan->keys_padded = keys_padded;
  plan->key_dim_padded = round_up(shape.key_dim, 16);
  plan->value_dim_padded = round_up(shape.value_dim, 16);
  plan->workspace_floats =
      shape.batch * chunks * keys_padded * (plan->key_dim_padded + plan->value_dim_padded);
  plan->smem_bytes = smem;
  return cudaSuccess;
}

template <typename T, int BM>
cudaError_t launch_backward_bm(const AttentionShape& shape, const AttentionBackwardPlan& plan,
                               const BackwardParams& params, cudaStream_t stream) {
  cudaError_t status = allow_dynamic_smem(short_attention_backward_kernel<T, BM>, plan.smem_bytes);
  if (status != cudaSuccess) {
    return status;
  }
  const dim3 grid(static_cast<unsigned>(plan.chunks_per_batch), static_cast<unsigned>(shape.batch));
  return launch_kernel<short_attention_backward_kernel<T, BM>>(grid, kThreads, plan.smem_bytes, stream, params);
}

template <typename T>
cudaError_t launch_reduce(const float* workspace, const AttentionShape& shape, const AttentionBackwardPlan& plan,
                          int cols, int ld, View3 out, cudaStream_t stream) {
  constexpr int kReduceThreads = 256;
  const int64_t total = shape.batch * shape.keys * cols;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kReduceThreads), 65535));
  return launch_kernel<reduce_chunks_kernel<T>>(blocks, kReduceThreads, 0, stream, workspace, plan.chunks_per_batch,
                                                static_cast<int>(shape.keys), cols,
                                                static_cast<int>(plan.keys_padded), ld, total, out);
}

template <typename T>
cudaError_t launch_backward(const AttentionShape& shape, const BackwardParams& params, View3 grad_key,
                            View3 grad_value, const AttentionBackwardPlan& plan, cudaStream_t stream) {
  cudaError_t status = cudaErrorInvalidValue;
  switch (plan.block_m) {
    case 64:
      status = launch_backward_bm<T, 64>(shape, plan, params, stream);
      break;
    case 16:
      status = launch_backward_bm<T, 16>(shape, plan, params, stream);
      break;
    default:
      break;
  }
  if (status != cudaSuccess) {
    return status;
  }
  status = launch_reduce<T>(params.workspace_key, shape, plan, params.key_dim, params.key_dim_padded, grad_key,
                            stream);
  if (status != cudaSuccess) {
    return status;
  }
  return launch_reduce<T>(params.workspace_value, shape, plan, params.value_dim, params.value_dim_padded, grad_value,
                          stream);
}

}  // namespace

cudaError_t short_attention_forward(DType dtype, const AttentionShape& shape, ConstView3 query, ConstView3 key,
                                    ConstView3 value, float scale, View3 out, float* logsumexp,
                                    cudaStream_t stream) {
  if (!valid_shape(shape)) {
    return cudaErrorInvalidValue;
  }
  const ForwardParams params{query,
                             key,
                             value,
                             out,
                             logsumexp,
                             static_cast<int>(shape.queries),
                             static_cast<int>(shape.keys),
                             static_cast<int>(shape.key_dim),
                             static_cast<int>(shape.value_dim),
                             scale};
  return dispatch_dtype<false>(dtype, [&](auto tag) {
    return launch_forward<typename decltype(tag)::type>(shape, params, stream);
  });
}

cudaError_t short_attention_backward_plan(DType dtype, const AttentionShape& shape, AttentionBackwardPlan* plan) {
  if (!valid_shape(shape) || plan == nullptr) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype<false>(dtype,
                               [&](auto tag) { return plan_backward<typename decltype(tag)::type>(shape, plan); });
}

cudaError_t short_attention_backward(DType dtype, const AttentionShape& shape, ConstView3 grad_out, ConstView3 query,
                                     ConstView3 key, ConstView3 value, float scale, View3 grad_query, View3 grad_key, View3 grad_value,
                                     const AttentionBackwardPlan& plan, float* workspace, cudaStream_t stream) {
  if (!valid_shape(shape)) {
    return cudaErrorInvalidValue;
  }
  const int64_t key_slots = shape.batch * plan.chunks_per_batch * plan.keys_padded * plan.key_dim_padded;
  const BackwardParams params{grad_out,
                              query,
                              key,
                              value,
                              grad_query,
                              workspace,
                              workspace + key_slots,
                              static_cast<int>(shape.queries),
                              static_cast<int>(shape.keys),
                              static_cast<int>(shape.key_dim),
                              static_cast<int>(shape.value_dim),
                              static_cast<int>(plan.key_dim_padded),
                              static_cast<int>(plan.value_dim_padded),
                              scale};
  return dispatch_dtype<false>(dtype, [&](auto tag) {
    return launch_backward<typename decltype(tag)::type>(shape, params, grad_key, grad_value, plan, stream);
  });
}

}  // namespace cuda_kernels
}  // namespace annkernels
