// CPU short attention: softmax(q k^T * scale) v for a short key axis S (ANN: S = 110), fused over
// tiles of queries so that a tile's [rows, S] scores never leave cache. GEMMs on tiles are BLAS calls
// (MKL here), single-threaded calls inside the intra-op threads' tasks (parallel_tasks below).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "annkernels/checks.h"

namespace annkernels {
namespace {

// Query rows per tile: the tile's [256, S] fp32 scores (110 KB at S = 110) stay in L2 between the GEMMs.
constexpr int64_t kQueryTile = 256;
// Query rows per dK/dV partial sum in the backward. Fixed, independent of the thread count, so the
// two-stage reduction over N adds the same numbers in the same order on every run.
constexpr int64_t kReductionChunk = 512;
// The key axis is padded with zero keys to a multiple of 8 inside the kernels: MKL's fp32 GEMM with
// 110 output columns runs at ~62 GFLOP/s on one core here, with 112 at ~80 (AVX2 microkernels are
// 8 or 16 wide). Padded scores are dropped before the softmax and padded probabilities are zero.
constexpr int64_t kKeyAlign = 8;

int64_t padded_keys(int64_t keys) { return (keys + kKeyAlign - 1) / kKeyAlign * kKeyAlign; }

// A matrix view: element (r, c) is data[r * row_stride + c * col_stride].
template <typename T>
struct MatView {
  T* data;
  int64_t row_stride;
  int64_t col_stride;

  MatView<T> transposed() const { return {data, col_stride, row_stride}; }
  MatView<const T> as_const() const { return {data, row_stride, col_stride}; }
};

// Whether BLAS can read a [rows, cols] view in place: unit stride along one axis and a leading
// dimension that covers the other (degenerate 1-wide axes accept any stride).
template <typename T>
bool is_column_major(const MatView<T>& v, int64_t rows, int64_t cols) {
  return v.row_stride == 1 && (cols == 1 || v.col_stride >= std::max<int64_t>(rows, 1));
}
template <typename T>
bool is_row_major(const MatView<T>& v, int64_t rows, int64_t cols) {
  return v.col_stride == 1 && (rows == 1 || v.row_stride >= std::max<int64_t>(cols, 1));
}

// The Fortran BLAS that PyTorch links (MKL in the x86 wheels exports sgemm_/dgemm_ from libtorch_cpu).
// at::native::cpublas::gemm would be the natural call, but its float/double overloads are not exported.
// Weak, so a torch without these symbols still loads the extension and falls back to at::addmm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

template <typename T>
constexpr auto blas_gemm() {
  if constexpr (std::is_same_v<T, float>) {
    return &sgemm_;
  } else {
    return &dgemm_;
  }
}

// C[m, n] = alpha * A[m, k] @ B[k, n] + beta * C, for views BLAS can address (see above). Called inside
// at::parallel_for, where MKL runs single-threaded rather than nesting its own OpenMP threads.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, T alpha, MatView<const T> a, MatView<const T> b, T beta, MatView<T> c) {
  if (!is_column_major(c, m, n)) {
    // BLAS writes column-major C; a row-major C is the column-major C^T = B^T A^T.
    const MatView<const T> a_t = a.transposed();
    a = b.transposed();
    b = a_t;
    c = c.transposed();
    std::swap(m, n);
  }
  const auto blas = blas_gemm<T>();
  if (blas == nullptr) {
    auto as_tensor = [](auto view, int64_t rows, int64_t cols) {
      using value_t = std::remove_const_t<std::remove_pointer_t<decltype(view.data)>>;
      return at::from_blob(const_cast<value_t*>(view.data), {rows, cols}, {view.row_stride, view.col_stride},
                           at::TensorOptions().dtype(c10::CppTypeToScalarType<value_t>::value));
    };
    at::Tensor out = as_tensor(c, m, n);
    at::addmm_out(out, out, as_tensor(a, m, k), as_tensor(b, k, n), beta, alpha);
    return;
  }
  // A dimension of extent 1 leaves its stride unused, but BLAS still checks ld >= rows.
  const bool a_plain = is_column_major(a, m, k);
  const bool b_plain = is_column_major(b, k, n);
  const int64_t lda64 = std::max(a_plain ? a.col_stride : a.row_stride, a_plain ? m : k);
  const int64_t ldb64 = std::max(b_plain ? b.col_stride : b.row_stride, b_plain ? k : n);
  const int64_t ldc64 = std::max(c.col_stride, m);
  TORCH_CHECK(std::max({lda64, ldb64, ldc64, m, n, k}) <= std::numeric_limits<int>::max(),
              "short_attention: a stride or size exceeds the 32-bit BLAS interface");
  const int lda = static_cast<int>(lda64), ldb = static_cast<int>(ldb64), ldc = static_cast<int>(ldc64);
  const int m32 = static_cast<int>(m), n32 = static_cast<int>(n), k32 = static_cast<int>(k);
  const char transa = a_plain ? 'N' : 'T', transb = b_plain ? 'N' : 'T';
  blas(&transa, &transb, &m32, &n32, &k32, &alpha, a.data, &lda, b.data, &ldb, &beta, c.data, &ldc);
}

// Leading dimension of a packed tile: `extent` rounded up to a cache line plus one cache line, so the
// lines of a 256-wide tile are not a power of two apart. The channel-first query, [Dk, N] with N = 8192,
// has its lines 32 KB apart, which maps a tile onto a few cache sets: one core's fp32 Q K^T on a
// [256, 256] tile took 223 us reading it in place and 173 + 24 us copied first (MKL, this VM).
constexpr int64_t padded_leading_dim(int64_t extent) { return (extent + 15) / 16 * 16 + 16; }

// Scratch elements pack() needs for a [rows, cols] tile.
constexpr int64_t pack_buffer_size(int64_t rows, int64_t cols) {
  return std::max(padded_leading_dim(rows) * cols, rows * padded_leading_dim(cols));
}

// Returns a [rows, cols] view of `src` in acc_t that BLAS reads efficiently: `src` itself when it is
// already a dense acc_t matrix, else a copy in `buffer` (pack_buffer_size elements) with a padded leading
// dimension, whose major axis follows the source's smaller stride so reads stay sequential.
template <typename acc_t, typename scalar_t>
MatView<const acc_t> pack(MatView<const scalar_t> src, int64_t rows, int64_t cols, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    const bool dense_row_major = src.col_stride == 1 && (rows == 1 || src.row_stride == cols);
    const bool dense_column_major = src.row_stride == 1 && (cols == 1 || src.col_stride == rows);
    if (dense_row_major || dense_column_major) return src;
  }
  if (std::abs(src.row_stride) < std::abs(src.col_stride)) {
    const int64_t ld = padded_leading_dim(rows);
    for (int64_t c = 0; c < cols; ++c) {
      const scalar_t* in = src.data + c * src.col_stride;
      acc_t* out = buffer + c * ld;
      for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<acc_t>(in[r * src.row_stride]);
    }
    return {buffer, 1, ld};
  }
  const int64_t ld = padded_leading_dim(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src.data + r * src.row_stride;
    acc_t* out = buffer + r * ld;
    for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<acc_t>(in[c * src.col_stride]);
  }
  return {buffer, ld, 1};
}

// Whether `dst`, a [rows, cols] output tile, is stored column by column (a channel-first output).
template <typename T>
bool is_column_major_tile(const MatView<T>& dst, int64_t cols) {
  return dst.row_stride == 1 && cols > 1;
}

// A tile result is computed into a cache-resident `buffer` (pack_buffer_size elements) laid out like
// `dst` with a padded leading dimension, and store() then writes it out: a GEMM writing a channel-first
// tile in place has the same power-of-two line stride (P V on a [256, 256] tile: 188 us against 172 us
// into the buffer, one core), and the copy is where the streaming stores below go.

template <typename acc_t, typename scalar_t>
MatView<acc_t> result_buffer(MatView<scalar_t> dst, int64_t rows, int64_t cols, acc_t* buffer) {
  if (is_column_major_tile(dst, cols)) return {buffer, 1, padded_leading_dim(rows)};
  return {buffer, padded_leading_dim(cols), 1};
}

// dst[0, count) = src[0, count), converting to dst's type. fp32 lines use non-temporal stores where
// `stream`: the outputs are far larger than the caches and are not read again by this kernel, so
// writing around the cache saves DRAM the read-for-ownership of every output line.
template <typename scalar_t, typename acc_t>
void store_line(scalar_t* dst, const acc_t* src, int64_t count, bool stream) {
#if defined(__SSE__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (stream) {
      int64_t i = 0;
      for (; i < count && reinterpret_cast<uintptr_t>(dst + i) % 16 != 0; ++i) dst[i] = src[i];
      for (; i + 4 <= count; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
      for (; i < count; ++i) dst[i] = src[i];
      return;
    }
  }
#endif
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Non-temporal stores are weakly ordered: a thread fences them before its tile counts as written.
void fence_streaming_stores() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Writes the [rows, cols] tile `src` (from result_buffer) into `dst`, line by line along dst's unit stride.
template <typename acc_t, typename scalar_t>
void store(MatView<scalar_t> dst, MatView<const acc_t> src, int64_t rows, int64_t cols, bool stream) {
  if (is_column_major_tile(dst, cols)) {
    for (int64_t c = 0; c < cols; ++c)
      store_line(dst.data + c * dst.col_stride, src.data + c * src.col_stride, rows, stream);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      store_line(dst.data + r * dst.row_stride, src.data + r * src.row_stride, cols, stream);
  }
}

// x[i] = exp(x[i]) in place. fp32: Cephes-style exp (range reduction by ln 2, degree-6 polynomial,
// about 1.2 ulp), written so that it vectorises: cloned for AVX2 because the extension is built for
// baseline x86-64, and without trapping math, which would keep the clamps as branches. NaN propagates;
// inputs below -87.3 give ~1e-38 instead of 0, harmless next to a row maximum of exp(0) = 1.
// fp64 keeps std::exp, so gradcheck sees the exact function.
__attribute__((target_clones("avx2", "default"), optimize("no-trapping-math"))) void exp_in_place(float* x,
                                                                                                   int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    float v = x[i] < -87.3f ? -87.3f : x[i];
    v = v > 88.7f ? 88.7f : v;
    // Adding and removing 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);
    float two_to_n;
    std::memcpy(&two_to_n, &bits, sizeof(float));
    x[i] = p * two_to_n;
  }
}
void exp_in_place(double* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = std::exp(x[i]);
}

// Packs key [S, Dk] and value [S, Dv] of every batch into row-major acc_t buffers of padded_keys(S)
// rows, the padding rows zero, once per call.
template <typename acc_t, typename scalar_t>
void pack_batches(const at::Tensor& t, std::vector<acc_t>& packed) {
  const int64_t batch = t.size(0), valid_rows = t.size(1), cols = t.size(2);
  const int64_t rows = padded_keys(valid_rows);
  packed.assign(batch * rows * cols, acc_t(0));
  const scalar_t* data = t.const_data_ptr<scalar_t>();
  const int64_t stride_b = t.stride(0), stride_r = t.stride(1), stride_c = t.stride(2);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* out = packed.data() + b * rows * cols;
      for (int64_t r = 0; r < valid_rows; ++r) {
        const scalar_t* in = data + b * stride_b + r * stride_r;
        for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = static_cast<acc_t>(in[c * stride_c]);
      }
    }
  });
}

template <typename T>
MatView<T> batch_view(const at::Tensor& t, int64_t b, int64_t row0) {
  T* base = const_cast<T*>(t.const_data_ptr<std::remove_const_t<T>>());
  return {base + b * t.stride(0) + row0 * t.stride(1), t.stride(1), t.stride(2)};
}


// A per-thread acc_t scratch buffer. Tensors come from PyTorch's allocator, 64-byte aligned, so MKL takes
// the same code path on every run (its results may depend on operand alignment).
template <typename acc_t>
at::Tensor scratch(int64_t size) {
  return at::empty({size}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// Runs `task(scratch, i)` for every i in [0, count) on the intra-op threads, handing tasks out one at a
// time from a shared counter. A static split waits for the slowest thread, and on a shared VM the
// cores do not run at the same speed (one of the two here took ~8% longer over the same tiles). Each
// thread gets its own acc_t scratch of `scratch_size` elements. Results must not depend on which thread
// runs a task; every caller's tasks write disjoint outputs.
template <typename acc_t, typename Task>
void parallel_tasks(int64_t count, int64_t scratch_size, const Task& task) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::Tensor buffer = scratch<acc_t>(scratch_size);
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) task(buffer.mutable_data_ptr<acc_t>(), i);
  });
}

// Row softmax of the [rows, keys] scaled scores (row stride padded_keys(keys)), in place, in acc_t (fp32,
// fp64 for fp64). The padding columns are set to zero probability.
template <typename acc_t>
void softmax_rows(acc_t* scores, int64_t rows, int64_t keys) {
  const int64_t stride = padded_keys(keys);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = scores + r * stride;
    acc_t max = row[0];
#pragma omp simd reduction(max : max)
    for (int64_t j = 0; j < keys; ++j) max = row[j] > max ? row[j] : max;
    for (int64_t j = 0; j < keys; ++j) row[j] -= max;
  }
  exp_in_place(scores, rows * stride);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = scores + r * stride;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < keys; ++j) sum += row[j];
    const acc_t inv_sum = acc_t(1) / sum;
    for (int64_t j = 0; j < keys; ++j) row[j] *= inv_sum;
    for (int64_t j = keys; j < stride; ++j) row[j] = 0;
  }
}

// Non-temporal stores pay off for outputs well beyond the caches (ANN training: 16 MB per tensor); a
// small output is better left in cache for the op that reads it next.
constexpr int64_t kStreamingStoreBytes = 8 << 20;
bool use_streaming_stores(const at::Tensor& output) {
  return output.scalar_type() == at::kFloat && output.numel() * output.element_size() >= kStreamingStoreBytes;
}

// Forward. One task per (batch, tile of kQueryTile queries). Per tile: pack Q (unless it is a dense
// acc_t matrix), scores = scale * Q K^T into a scratch tile, row softmax there in place (fp32; fp64 for
// fp64), P copied out to `probs` [B, N, S_pad] acc_t, then out = P V into a result buffer and copied to
// `out`, which has query's layout. K and V are packed once per call into row-major acc_t. P is kept for
// the backward: at S = 110 it is smaller than Q, and reusing it saves the backward a Q K^T product and
// a softmax, a seventh of the GEMM work on a CPU that is compute-bound here.
template <typename scalar_t>
void short_attention_forward_kernel(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                    double scale, at::Tensor& out, at::Tensor& probs_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = query.size(0), queries = query.size(1), dk = query.size(2);
  const int64_t keys = key.size(1), keys_padded = padded_keys(keys), dv = value.size(2);
  std::vector<acc_t> key_packed, value_packed;
  pack_batches<acc_t, scalar_t>(key, key_packed);
  pack_batches<acc_t, scalar_t>(value, value_packed);
  const int64_t tiles_per_batch = (queries + kQueryTile - 1) / kQueryTile;
  acc_t* probs_data = probs_out.mutable_data_ptr<acc_t>();

  const bool stream_out = use_streaming_stores(out), stream_probs = use_streaming_stores(probs_out);
  const int64_t out_buffer_size = pack_buffer_size(kQueryTile, dv);
  parallel_tasks<acc_t>(batch * tiles_per_batch,
                        pack_buffer_size(kQueryTile, dk) + out_buffer_size + kQueryTile * keys_padded,
                        [&](acc_t* buffers, int64_t task) {
    acc_t* query_buffer = buffers;
    acc_t* out_buffer = query_buffer + pack_buffer_size(kQueryTile, dk);
    acc_t* scores = out_buffer + out_buffer_size;
    const int64_t b = task / tiles_per_batch;
    const int64_t n0 = (task % tiles_per_batch) * kQueryTile;
    const int64_t rows = std::min(kQueryTile, queries - n0);
    const MatView<const acc_t> key_t{key_packed.data() + b * keys_padded * dk, 1, dk};  // K^T [Dk, S_pad]
    const MatView<const acc_t> v{value_packed.data() + b * keys_padded * dv, dv, 1};
    const MatView<acc_t> probs{scores, keys_padded, 1};

    const auto q = pack<acc_t>(batch_view<const scalar_t>(query, b, n0), rows, dk, query_buffer);
    gemm<acc_t>(rows, keys_padded, dk, static_cast<acc_t>(scale), q, key_t, acc_t(0), probs);
    softmax_rows(scores, rows, keys);
    store_line(probs_data + (b * queries + n0) * keys_padded, scores, rows * keys_padded, stream_probs);
    const auto out_tile = batch_view<scalar_t>(out, b, n0);
    const auto o = result_buffer(out_tile, rows, dv, out_buffer);
    gemm<acc_t>(rows, dv, keys_padded, acc_t(1), probs.as_const(), v, acc_t(0), o);
    store(out_tile, o.as_const(), rows, dv, stream_out);
    if (stream_out || stream_probs) fence_streaming_stores();
  });
}

// Backward. Stage 1, one task per (batch, chunk of kReductionChunk queries); a chunk walks its
// kQueryTile tiles in order: P from the forward, dP = dO V^T, D = rowsum(P * dP) (equal to
// rowsum(dO * O)), dS = P * (dP - D), dQ = scale * dS K (written once per tile), and accumulates the
// chunk's partial dK += scale * dS^T Q and dV += P^T dO in acc_t. Stage 2, parallel over (batch, key
// row): adds the chunk partials in chunk order and writes dK, dV. Chunks do not depend on the thread
// count, so the result is bitwise reproducible; no atomics. Grads take their inputs' layouts.
template <typename scalar_t>
void short_attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& probs_saved, double scale,
                                     at::Tensor& grad_query,
                                     at::Tensor& grad_key, at::Tensor& grad_value) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = query.size(0), queries = query.size(1), dk = query.size(2);
  const int64_t keys = key.size(1), keys_padded = padded_keys(keys), dv = value.size(2);
  std::vector<acc_t> key_packed, value_packed;
  pack_batches<acc_t, scalar_t>(key, key_packed);
  pack_batches<acc_t, scalar_t>(value, value_packed);
  const int64_t chunks_per_batch = (queries + kReductionChunk - 1) / kReductionChunk;
  const int64_t partial_size = keys_padded * (dk + dv);
  at::Tensor partials = scratch<acc_t>(batch * chunks_per_batch * partial_size);
  acc_t* partial_data = partials.mutable_data_ptr<acc_t>();
  const acc_t* probs_data = probs_saved.const_data_ptr<acc_t>();
  const bool stream_grad_query = use_streaming_stores(grad_query);

  parallel_tasks<acc_t>(batch * chunks_per_batch,
                        pack_buffer_size(kQueryTile, dk) * 2 + pack_buffer_size(kQueryTile, dv) +
                            kQueryTile * keys_padded,
                        [&](acc_t* buffers, int64_t task) {
    acc_t* query_buffer = buffers;
    acc_t* grad_out_buffer = query_buffer + pack_buffer_size(kQueryTile, dk);
    acc_t* grad_query_buffer = grad_out_buffer + pack_buffer_size(kQueryTile, dv);
    acc_t* grad_scores = grad_query_buffer + pack_buffer_size(kQueryTile, dk);
    const int64_t b = task / chunks_per_batch;
    const int64_t chunk_start = (task % chunks_per_batch) * kReductionChunk;
    const int64_t chunk_end = std::min(queries, chunk_start + kReductionChunk);
    const MatView<const acc_t> k{key_packed.data() + b * keys_padded * dk, dk, 1};
    const MatView<const acc_t> v{value_packed.data() + b * keys_padded * dv, dv, 1};
    const MatView<acc_t> grad_key_partial{partial_data + task * partial_size, dk, 1};
    const MatView<acc_t> grad_value_partial{partial_data + task * partial_size + keys_padded * dk, dv, 1};
    const MatView<acc_t> ds{grad_scores, keys_padded, 1};

    for (int64_t n0 = chunk_start; n0 < chunk_end; n0 += kQueryTile) {
      const int64_t rows = std::min(kQueryTile, chunk_end - n0);
      const auto q = pack<acc_t>(batch_view<const scalar_t>(query, b, n0), rows, dk, query_buffer);
      const auto dout = pack<acc_t>(batch_view<const scalar_t>(grad_out, b, n0), rows, dv, grad_out_buffer);
      const acc_t* probs = probs_data + (b * queries + n0) * keys_padded;
      const MatView<const acc_t> p{probs, keys_padded, 1};
      gemm<acc_t>(rows, keys_padded, dv, acc_t(1), dout, v.transposed(), acc_t(0), ds);
      for (int64_t r = 0; r < rows; ++r) {
        // Padded columns: P = 0 there, so they add nothing and their dS is zero.
        const acc_t* p_row = probs + r * keys_padded;
        acc_t* ds_row = grad_scores + r * keys_padded;
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < keys_padded; ++j) dot += p_row[j] * ds_row[j];
        for (int64_t j = 0; j < keys_padded; ++j) ds_row[j] = p_row[j] * (ds_row[j] - dot);
      }
      const auto grad_query_tile = batch_view<scalar_t>(grad_query, b, n0);
      const auto dq = result_buffer(grad_query_tile, rows, dk, grad_query_buffer);
      gemm<acc_t>(rows, dk, keys_padded, static_cast<acc_t>(scale), ds.as_const(), k, acc_t(0), dq);
      store(grad_query_tile, dq.as_const(), rows, dk, stream_grad_query);
      if (stream_grad_query) fence_streaming_stores();
      const acc_t beta = n0 == chunk_start ? acc_t(0) : acc_t(1);
      gemm<acc_t>(keys_padded, dk, rows, static_cast<acc_t>(scale), ds.as_const().transposed(), q, beta,
                  grad_key_partial);
      gemm<acc_t>(keys_padded, dv, rows, acc_t(1), p.transposed(), dout, beta, grad_value_partial);
    }
  });

  const int64_t width = dk + dv;
  at::parallel_for(0, batch * keys, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / keys, j = task % keys;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t chunk = 0; chunk < chunks_per_batch; ++chunk) {
        const acc_t* partial = partial_data + (b * chunks_per_batch + chunk) * partial_size;
        for (int64_t c = 0; c < dk; ++c) sum[c] += partial[j * dk + c];
        for (int64_t c = 0; c < dv; ++c) sum[dk + c] += partial[keys_padded * dk + j * dv + c];
      }
      scalar_t* gk = grad_key.mutable_data_ptr<scalar_t>() + b * grad_key.stride(0) + j * grad_key.stride(1);
      scalar_t* gv = grad_value.mutable_data_ptr<scalar_t>() + b * grad_value.stride(0) + j * grad_value.stride(1);
      for (int64_t c = 0; c < dk; ++c) gk[c * grad_key.stride(2)] = static_cast<scalar_t>(sum[c]);
      for (int64_t c = 0; c < dv; ++c) gv[c * grad_value.stride(2)] = static_cast<scalar_t>(sum[dk + c]);
    }
  });
}

// The CPU saves P in the accumulate type: fp32, or fp64 for fp64 inputs.
at::ScalarType softmax_state_dtype(const at::Tensor& query) {
  return query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> short_attention_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                               const at::Tensor& value, double scale) {
  check_attention_inputs(query, key, value, at::Device(at::kCPU));
  const int64_t batch = query.size(0), queries = query.size(1);
  at::Tensor out = empty_like_layout(query, batch, queries, value.size(2), query.scalar_type());
  at::Tensor probs =
      at::empty({batch, queries, padded_keys(key.size(1))}, query.options().dtype(softmax_state_dtype(query)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "short_attention_forward_cpu", [&] {
    short_attention_forward_kernel<scalar_t>(query, key, value, scale, out, probs);
  });
  return {out, probs};
}

// `softmax_state` is the forward's P; `out` is validated but not read: rowsum(P * dP) replaces
// rowsum(dO * O).
std::tuple<at::Tensor, at::Tensor, at::Tensor> short_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& softmax_state, double scale) {
  check_attention_inputs(query, key, value, at::Device(at::kCPU));
  check_attention_grad_out(grad_out, out, query, value);
  const int64_t batch = query.size(0), queries = query.size(1), keys = key.size(1);
  const int64_t dk = query.size(2), dv = value.size(2);
  TORCH_CHECK(softmax_state.dim() == 3 && softmax_state.size(0) == batch && softmax_state.size(1) == queries &&
                  softmax_state.size(2) == padded_keys(keys) && softmax_state.is_contiguous(),
              "softmax_state must be the forward's contiguous probabilities [", batch, ", ", queries, ", ",
              padded_keys(keys), "], got ", softmax_state.sizes());
  TORCH_CHECK(softmax_state.scalar_type() == softmax_state_dtype(query), "softmax_state must be ",
              softmax_state_dtype(query), ", got ", softmax_state.scalar_type());
  at::Tensor grad_query = empty_like_layout(query, batch, queries, dk, query.scalar_type());
  at::Tensor grad_key = empty_like_layout(key, batch, keys, dk, query.scalar_type());
  at::Tensor grad_value = empty_like_layout(value, batch, keys, dv, query.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "short_attention_backward_cpu", [&] {
    short_attention_backward_kernel<scalar_t>(grad_out, query, key, value, softmax_state, scale, grad_query, grad_key,
                                              grad_value);
  });
  return {grad_query, grad_key, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(annkernels, CPU, m) {
  m.impl("_short_attention_forward", &short_attention_forward_cpu);
  m.impl("_short_attention_backward", &short_attention_backward_cpu);
}

// No tensor arguments, so no device to dispatch on.
TORCH_LIBRARY_IMPL(annkernels, CompositeExplicitAutograd, m) {
  m.impl("_short_attention_cpu_key_alignment", [] { return kKeyAlign; });
}

}  // namespace annkernels
