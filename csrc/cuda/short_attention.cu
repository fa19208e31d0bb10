// Fused short-key attention (ANN): softmax(q k^T * scale) v with few keys (S <= 1024), on tensor cores.
//
// A block owns BM query rows and keeps their whole score row (all S keys, padded to a multiple of 16) in
// shared memory, so the N x S matrix never reaches global memory; the forward saves only logsumexp.
// Products run on WMMA: fp16/bf16 inputs use m16n16k16 with fp32 accumulation; fp32 inputs use
// m16n16k8 TF32 with the 3xTF32 split (a*b ~ a_hi*b_hi + a_hi*b_lo + a_lo*b_hi), which keeps close to
// fp32 accuracy instead of TF32's 10-bit mantissa. Softmax statistics are fp32 for every dtype.
//
// Operands are streamed through shared memory in tiles. Loads run threads along whichever operand axis
// has stride 1, so the channel-first views [B, N, D] with stride (D*N, 1, N) are read coalesced along N, and
// each thread issues a batch of loads (16-byte, or 2-entry words, where the layout allows) before storing any
// (load_tile). When both operands of a product are channel-first, their tiles keep that orientation in shared
// memory and the fragments load col_major (scores_product, output_product); otherwise a channel-first
// operand is stored column by column, spread over banks so the stores do not conflict. Outputs are staged in
// fp32 and written the same way. The backward is three launches: a scores kernel per
// query tile (S, dP, softmax backward, dQ; P and dS to a workspace), a key/value GEMM split over the queries
// with fp32 partials per chunk, and a reduce that adds the chunks in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "short_attention.h"

namespace annkernels {
namespace cuda_kernels {
namespace {

namespace wmma = nvcuda::wmma;

// The attention kernels declare __launch_bounds__(kThreads, 2), a budget of 255 registers: given only the thread
// count, ptxas held the fp32 kernels near 96 registers, where they spilled and split their tile batches.
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

// The fp32 stage of a kTileN-column output pass (write_output_tile), in either orientation.
template <int BM>
__host__ __device__ constexpr size_t output_stage_bytes() {
  constexpr int kRowMajor = BM * (kTileN + 4);
  constexpr int kColMajor = kTileN * (BM + 4);
  return static_cast<size_t>(kRowMajor > kColMajor ? kRowMajor : kColMajor) * sizeof(float);
}

template <typename T, int BM>
constexpr size_t stage_bytes() {
  const size_t qk_tiles = static_cast<size_t>(BM + kTileN) * (kChunkK + kPad<T>) * sizeof(T);
  // Value (or key) tiles of P v and dS k: [kChunkS][kTileN], or [kTileN][kChunkS] in global orientation.
  const size_t value_tile =
      static_cast<size_t>(std::max(kChunkS * (kTileN + kPad<T>), kTileN * (kChunkS + kPad<T>))) * sizeof(T);
  const size_t out_stage = output_stage_bytes<BM>();
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

// Elements of T in one 16-byte load or store.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));
// Loads a thread keeps in flight before storing them to shared memory: 8 vectors (128 bytes) or 8 scalars.
// More would add registers to kernels that already hold their accumulators (spills).
constexpr int kVectorBatch = 8;
constexpr int kScalarBatch = 8;

// Entry i of a 16-byte vector of T, through 32-bit words: the vector stays in registers (a T* into a register
// array would send it to local memory). i is a constant once the callers' loops are unrolled.
__device__ __forceinline__ uint32_t vector_word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ T vector_entry(const uint4& v, int i) {
  constexpr int kPerWord = static_cast<int>(4 / sizeof(T));
  const uint32_t word = vector_word(v, i / kPerWord) >> (32 / kPerWord * (i % kPerWord));
  T entry;
  if constexpr (kPerWord == 1) {
    __builtin_memcpy(&entry, &word, sizeof(T));
  } else {
    const uint16_t half_word = static_cast<uint16_t>(word);
    __builtin_memcpy(&entry, &half_word, sizeof(T));
  }
  return entry;
}

// load_tile's 16-byte path, for tiles that no vector straddles the edge of: the fast axis (stride 1) is the rows
// when kRowsFastest, else the columns; vector g covers kVec<T> consecutive entries of it. fetch issues the kCount
// loads of the batch that starts at vector `first` (predicated, not branched around, so the batch is
// straight-line code and its loads are in flight together); store writes them to shared memory.
//
// A row-major destination takes each vector in one 16-byte shared store; a warp covers 8 vectors (128 bytes)
// of each of 4 lines. A transposed destination (kRowsFastest) takes each vector entry by entry, down a column
// of the row-major tile, and its rows are 16-byte padded: every tile row here is a multiple of 128 bytes plus
// 16, so rows r and r + d lie 4d banks apart. A warp covers 2 vectors (one 32-byte sector) of each of 16 lines:
// its 16 lines span 8 (16-bit types) or 16 (fp32) banks, and the second vector's rows must sit 16 banks from
// the first's, an odd multiple of 4 rows away. For fp32 that is kVec = 4 rows already; for 16-bit types the
// second vector stores its entries in the order 4..7, 0..3 (12 and 4 rows away). So the column stores are
// conflict-free (the emulator counts it: tests/test_cuda_emulated.py).
template <typename T, int ROWS, int COLS, bool kRowsFastest, typename Vector = uint4>
struct TileVectors {
  static constexpr int kEntries = static_cast<int>(sizeof(Vector) / sizeof(T));  // per vector
  static constexpr int kFast = kRowsFastest ? ROWS : COLS;
  static constexpr int kSlow = kRowsFastest ? COLS : ROWS;
  static constexpr int kVectorsPerLine = kFast / kEntries;
  static constexpr int kPerThread = ROWS * COLS / kEntries / kThreads;
  // Vectors of a line per warp: 128 bytes for row-major stores; one 32-byte sector for column stores.
  static constexpr int kLineVectors = kRowsFastest ? 2 : static_cast<int>(128 / sizeof(Vector));
  static constexpr int kWarpFast = kVectorsPerLine < kLineVectors ? kVectorsPerLine : kLineVectors;
  static constexpr int kWarpLines = kWarpSize / kWarpFast;
  // Entries by which the second vector of a line rotates its column stores (see above).
  static constexpr int kRotation = kEntries == 8 ? 4 : 0;
  static_assert(!kRowsFastest || std::is_same_v<Vector, uint4>, "column stores take 16-byte vectors");
  static_assert(kFast % kEntries == 0 && (kPerThread % kVectorBatch == 0 || kPerThread < kVectorBatch),
                "tile shape must split into whole vector batches");
  static_assert(kVectorsPerLine % kWarpFast == 0 && kSlow % kWarpLines == 0,
                "tile shape must split into whole warp blocks");

  // This thread's vector of load step `step` (vectors step * kThreads + threadIdx.x): its first entry along the
  // fast axis, its line along the slow one. The warps of a step take consecutive line blocks, so a thread's
  // vectors lie at constant offsets from its first (step is a constant once the batch loop is unrolled).
  static constexpr int kLineBlocks = kSlow / kWarpLines;
  static_assert(kLineBlocks % kWarps == 0 || kWarps % kLineBlocks == 0, "a step's warps must take whole blocks");
  static __device__ __forceinline__ int2 place(int step) {
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    int line_block, fast_block;
    if constexpr (kLineBlocks % kWarps == 0) {
      line_block = warp + kWarps * (step % (kLineBlocks / kWarps));
      fast_block = step / (kLineBlocks / kWarps);
    } else {  // fewer line blocks than warps: the warps also split the fast axis
      line_block = warp % kLineBlocks;
      fast_block = warp / kLineBlocks + kWarps / kLineBlocks * step;
    }
    return make_int2((fast_block * kWarpFast + lane % kWarpFast) * kEntries,
                     line_block * kWarpLines + lane / kWarpFast);
  }

  template <int kCount>
  static __device__ __forceinline__ void fetch(Vector (&values)[kCount], int first, const T* __restrict__ src,
                                               int64_t slow_stride, int rows, int cols) {
    const int fast_valid = kRowsFastest ? rows : cols;
    const int slow_valid = kRowsFastest ? cols : rows;
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      const int2 at = place(first + i);
      const bool inside = at.y < slow_valid && at.x + kEntries <= fast_valid;
      values[i] = inside ? *reinterpret_cast<const Vector*>(src + at.y * slow_stride + at.x) : Vector{};
    }
  }

  template <int kCount>
  static __device__ __forceinline__ void store(T* dst, int ld, const Vector (&values)[kCount], int first) {
    // Transposed: this lane's entries go to rows (v + rotation) % kVec of its vector, v = 0..kVec-1; those
    // past the vector's end wrap to its start. Two base pointers keep every store at a constant offset.
    const int rotation = threadIdx.x % kWarpFast == 1 ? kRotation : 0;
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      const int2 at = place(first + i);
      if constexpr (kRowsFastest) {
        const uint4& v = values[i];
        static_assert(kRotation == 0 || kRotation * sizeof(T) == 8, "the rotation swaps the vector's halves");
        const uint4 rotated = rotation == 0 ? v : make_uint4(v.z, v.w, v.x, v.y);
        T* unwrapped = dst + (at.x + rotation) * ld + at.y;
        T* wrapped = unwrapped - (rotation == 0 ? 0 : kEntries * ld);
#pragma unroll
        for (int e = 0; e < kEntries; ++e) {
          (e < kEntries - kRotation ? unwrapped : wrapped)[e * ld] = vector_entry<T>(rotated, e);
        }
      } else {
        *reinterpret_cast<Vector*>(dst + at.y * ld + at.x) = values[i];
      }
    }
  }

  // The whole tile, one batch at a time.
  static __device__ __forceinline__ void load(T* dst, int ld, const T* __restrict__ src, int64_t slow_stride,
                                              int rows, int cols) {
    constexpr int kBatch = kPerThread < kVectorBatch ? kPerThread : kVectorBatch;
#pragma unroll 1
    for (int first = 0; first < kPerThread; first += kBatch) {
      Vector values[kBatch];
      fetch(values, first, src, slow_stride, rows, cols);
      store(dst, ld, values, first);
    }
  }

  // The whole tile by asynchronous copies, row-major (no register holds a vector, so every copy of the tile is
  // in flight at once); vectors outside rows x cols are zeroed by plain stores. Same warp blocks as store().
  static __device__ __forceinline__ void copy_async(T* dst, int ld, const T* __restrict__ src, int64_t slow_stride,
                                                    int rows, int cols) {
    static_assert(!kRowsFastest, "asynchronous copies keep the source's orientation");
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int2 at = place(i);
      T* to = dst + at.y * ld + at.x;
      if (at.y < rows && at.x + kEntries <= cols) {
        __pipeline_memcpy_async(to, src + at.y * slow_stride + at.x, sizeof(Vector));
      } else {
        *reinterpret_cast<Vector*>(to) = Vector{};
      }
    }
  }
};

// load_tile's scalar path: the loads of a batch are predicated, not branched around. When the rows are the
// fast axis, a warp covers 8 rows by 4 columns (one column each would put 4 of its 32 stores in each bank used,
// rows being 4 words apart modulo 32 with 16-byte padding: see TileVectors); else 32 entries of one row.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile_scalars(T* dst, int ld, const T* __restrict__ src, int64_t row_stride,
                                                  int64_t col_stride, int rows, int cols, bool rows_fastest) {
  constexpr int kPerThread = ROWS * COLS / kThreads;
  static_assert(kPerThread % kScalarBatch == 0 || kPerThread < kScalarBatch,
                "tile shape must split into whole scalar batches");
  static_assert(ROWS % 8 == 0 && COLS % 4 == 0, "tile shape must split into 8 x 4 warp blocks");
  constexpr int kBatch = kPerThread < kScalarBatch ? kPerThread : kScalarBatch;
  const T zero = from_acc<T>(0.0f);
  // This thread's entry of load step `step`: its row and column (as TileVectors::place, in 8 x 4 warp blocks,
  // column blocks first, when the rows are the fast axis).
  static_assert(COLS / 4 % kWarps == 0 && kThreads % COLS == 0, "tile shape must split into whole warp steps");
  const auto place = [rows_fastest](int step) {
    const int lane = threadIdx.x % kWarpSize;
    constexpr int kStepsPerRowBlock = COLS / 4 / kWarps;
    const int column_block = threadIdx.x / kWarpSize + kWarps * (step % kStepsPerRowBlock);
    const int row_block = step / kStepsPerRowBlock;
    return rows_fastest ? make_int2(row_block * 8 + lane % 8, column_block * 4 + lane / 8)
                        : make_int2(step * (kThreads / COLS) + static_cast<int>(threadIdx.x) / COLS,
                                    static_cast<int>(threadIdx.x) % COLS);
  };
#pragma unroll 1
  for (int first = 0; first < kPerThread; first += kBatch) {
    T values[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int2 at = place(first + i);
      values[i] = (at.x < rows && at.y < cols) ? src[at.x * row_stride + at.y * col_stride] : zero;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int2 at = place(first + i);
      dst[at.x * ld + at.y] = values[i];
    }
  }
}

// Channel-first operands of a product: stride 1 along the rows (N or S), as a conv output's view gives.
__host__ __device__ __forceinline__ bool rows_contiguous(int64_t row_stride, int64_t col_stride) {
  return row_stride == 1 && col_stride != 1;
}

struct NothingMore {
  __device__ __forceinline__ void operator()() const {}
};

// Copies a ROWS x COLS tile of a strided global matrix into shared memory (row-major, leading dimension ld, a
// multiple of 16 bytes); rows and cols are at least 1, and entries outside rows x cols are zero, so padded
// keys, rows and depth add nothing to products. Threads run along the source's stride-1 axis (coalesced). Each
// thread issues a batch of loads into registers before it stores any of them, so a batch's loads are in flight
// together instead of one after another. Each load reads 16 bytes when that axis has stride 1, the base is
// 16-byte aligned, the other stride is a multiple of 16 bytes and no vector straddles the tile's edge; the
// loads are scalar otherwise (an odd N such as 9409, an offset view, a stride-0 or permuted gradient).
//
// load_next() loads the stage's other tile (load_tile again, or nothing). A tile of fewer than kVectorBatch
// vectors per thread (a 16- or 64-row query tile, the key/value kernel's 64 x 64 tile) is a batch too small
// to keep loads in flight on its own, so its vectors stay in registers while load_next() issues its loads, and
// are stored after it.
template <typename T, int ROWS, int COLS, typename LoadNext = NothingMore>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* __restrict__ src, int64_t row_stride,
                                          int64_t col_stride, int rows, int cols, LoadNext load_next = {}) {
  const bool rows_fastest = rows_contiguous(row_stride, col_stride);
  const int64_t slow_stride = rows_fastest ? col_stride : row_stride;
  const int fast_valid = rows_fastest ? rows : cols;
  const bool vectors = (rows_fastest || col_stride == 1) && slow_stride % kVec<T> == 0 &&
                       reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                       (fast_valid % kVec<T> == 0 || fast_valid >= (rows_fastest ? ROWS : COLS));
  // 16-bit rows whose length is even but not a multiple of 8 (S = 110 keys) still take pairs in 4-byte words
  // into row-major tiles: half the loads and shared stores of the scalar path.
  constexpr bool kPairs = sizeof(T) == 2;
  const bool pairs = kPairs && !vectors && !rows_fastest && col_stride == 1 && slow_stride % 2 == 0 &&
                     reinterpret_cast<uintptr_t>(src) % 4 == 0 && (fast_valid % 2 == 0 || fast_valid >= COLS);
  using RowsFastest = TileVectors<T, ROWS, COLS, true>;
  using ColsFastest = TileVectors<T, ROWS, COLS, false>;
  using ColsFastestPairs = TileVectors<T, ROWS, COLS, false, uint32_t>;
  static_assert(RowsFastest::kPerThread == ColsFastest::kPerThread, "one vector count per tile");
  constexpr int kPerThread = RowsFastest::kPerThread;
  const auto load_narrow = [&] {
    if (kPairs && pairs) {
      ColsFastestPairs::load(dst, ld, src, slow_stride, rows, cols);
    } else {
      load_tile_scalars<T, ROWS, COLS>(dst, ld, src, row_stride, col_stride, rows, cols, rows_fastest);
    }
  };
  if constexpr (kPerThread < kVectorBatch) {
    // Pairs too few for a batch of their own wait in registers like the vectors.
    constexpr int kStagedPairs =
        kPairs && ColsFastestPairs::kPerThread < kVectorBatch ? ColsFastestPairs::kPerThread : 0;
    uint4 values[kPerThread];
    uint32_t pair_values[kStagedPairs > 0 ? kStagedPairs : 1];
    if (vectors && rows_fastest) {
      RowsFastest::fetch(values, 0, src, slow_stride, rows, cols);
    } else if (vectors) {
      ColsFastest::fetch(values, 0, src, slow_stride, rows, cols);
    } else if constexpr (kStagedPairs > 0) {
      if (pairs) {
        ColsFastestPairs::fetch(pair_values, 0, src, slow_stride, rows, cols);
      }
    }
    load_next();
    if (vectors && rows_fastest) {
      RowsFastest::store(dst, ld, values, 0);
    } else if (vectors) {
      ColsFastest::store(dst, ld, values, 0);
    } else if (kStagedPairs > 0 && pairs) {
      if constexpr (kStagedPairs > 0) {
        ColsFastestPairs::store(dst, ld, pair_values, 0);
      }
    } else {
      load_narrow();
    }
  } else {
    if (vectors && rows_fastest) {
      RowsFastest::load(dst, ld, src, slow_stride, rows, cols);
    } else if (vectors) {
      ColsFastest::load(dst, ld, src, slow_stride, rows, cols);
    } else {
      load_narrow();
    }
    load_next();
  }
}

// Copies a ROWS x COLS tile whose columns are the source's stride-1 axis (a channel-first operand's [channel][row]
// block) into shared memory in that orientation, by asynchronous copies where the layout allows them: 16-byte
// vectors, else 4-byte words (two 16-bit entries, or one fp32), under the rules of load_tile's vector path. The
// caller commits the batch (__pipeline_commit) and lands it (__pipeline_wait_prior, then a barrier). A layout that
// allows neither (a 16-bit type with an odd row stride, such as N = 9409) is loaded here and now, by load_tile's
// scalar path (its vector and word paths take exactly the layouts copied asynchronously).
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void copy_tile_async(T* dst, int ld, const T* __restrict__ src, int64_t row_stride,
                                                int rows, int cols) {
  const auto copies = [&](int bytes) {
    const int entries = bytes / static_cast<int>(sizeof(T));
    return row_stride % entries == 0 && reinterpret_cast<uintptr_t>(src) % bytes == 0 &&
           (cols % entries == 0 || cols >= COLS);
  };
  if (copies(16)) {
    TileVectors<T, ROWS, COLS, false>::copy_async(dst, ld, src, row_stride, rows, cols);
  } else if (copies(4)) {
    TileVectors<T, ROWS, COLS, false, uint32_t>::copy_async(dst, ld, src, row_stride, rows, cols);
  } else {
    load_tile_scalars<T, ROWS, COLS>(dst, ld, src, row_stride, 1, rows, cols, false);
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

// A warp's accumulators in a tile GEMM: all BM rows by FRAGS_N 16-column fragments, columns
// (warp * FRAGS_N + f) * 16 of a pass of kWarps * FRAGS_N * 16 (kTileN unless a GEMM widens it).
template <typename T, int BM, int FRAGS_N = kFragsN>
using WarpAccumulators = typename Mma<T>::Acc[BM / 16][FRAGS_N];

template <typename T, int BM, int FRAGS_N = kFragsN>
__device__ __forceinline__ void zero_accumulators(WarpAccumulators<T, BM, FRAGS_N>& acc) {
#pragma unroll
  for (int m = 0; m < BM / 16; ++m) {
#pragma unroll
    for (int f = 0; f < FRAGS_N; ++f) {
      wmma::fill_fragment(acc[m][f], 0.0f);
    }
  }
}

// One k step (Mma<T>::kK deep) of a warp's row block: acc[m][f] += A[16m, 16m + 16) x B(col_f) for the warp's
// columns col_f = (warp * FRAGS_N + f) * 16 with n0 + col_f < cols. A is at `a` (already at this k step, leading
// dimension ld_a), row-major ([m][k]) or col_major ([k][m]) as LayoutA says; load_b(fragment, col) loads B's
// fragment for column col. Every warp loads all of A's fragments, so wider warp columns (FRAGS_N) read A less.
template <typename T, int BM, typename LayoutA, typename LayoutB, int FRAGS_N = kFragsN, typename LoadB>
__device__ __forceinline__ void mma_k_step(WarpAccumulators<T, BM, FRAGS_N>& acc, const T* a, int ld_a, int n0,
                                           int cols, LoadB load_b) {
  using M = Mma<T>;
  constexpr int kRowFrags = BM / 16;
  constexpr bool kRowMajorA = std::is_same_v<LayoutA, wmma::row_major>;
  const int warp = threadIdx.x / kWarpSize;
  typename M::template A<LayoutA> a_frag[kRowFrags];
#pragma unroll
  for (int m = 0; m < kRowFrags; ++m) {
    M::load(a_frag[m], a + (kRowMajorA ? 16 * m * ld_a : 16 * m), ld_a);
  }
#pragma unroll
  for (int f = 0; f < FRAGS_N; ++f) {
    const int col = (warp * FRAGS_N + f) * 16;
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

// The warp's accumulators of one 128-column pass (columns n0..) into fp32 score rows (ld_out), columns past
// cols_padded left alone.
template <typename T, int BM>
__device__ __forceinline__ void store_score_tile(const WarpAccumulators<T, BM>& acc, float* out, int ld_out, int n0,
                                                 int cols_padded) {
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int f = 0; f < kFragsN; ++f) {
    const int col = (warp * kFragsN + f) * 16;
    if (n0 + col < cols_padded) {
#pragma unroll
      for (int m = 0; m < BM / 16; ++m) {
        wmma::store_matrix_sync(out + 16 * m * ld_out + n0 + col, acc[m][f], ld_out, wmma::mem_row_major);
      }
    }
  }
}

// The block's accumulators of one output pass (columns n0.. of cols) to the strided global `out` (out_rows
// valid), staged kTileN columns at a time in fp32 at out_stage, in the output's orientation so the writes run
// along its stride-1 axis. Each stage starts with a barrier: it may overlay operand tiles the block has just
// read, or hold the columns before it still being written out.
template <typename T, int BM, int FRAGS_N = kFragsN>
__device__ __forceinline__ void write_output_tile(const WarpAccumulators<T, BM, FRAGS_N>& acc, float* out_stage,
                                                  int n0, int cols, T* __restrict__ out, int64_t o_rs, int64_t o_cs,
                                                  int out_rows) {
  constexpr int kPassN = kWarps * FRAGS_N * 16;
  const bool stage_col_major = rows_contiguous(o_rs, o_cs);
  const int ld_out = stage_col_major ? BM + 4 : kTileN + 4;
  const int warp = threadIdx.x / kWarpSize;
  for (int s0 = 0; s0 < kPassN && n0 + s0 < cols; s0 += kTileN) {
    __syncthreads();
#pragma unroll
    for (int f = 0; f < FRAGS_N; ++f) {
      const int col = (warp * FRAGS_N + f) * 16 - s0;  // in the stage
      if (col >= 0 && col < kTileN && n0 + s0 + col < cols) {
#pragma unroll
        for (int m = 0; m < BM / 16; ++m) {
          if (stage_col_major) {
            wmma::store_matrix_sync(out_stage + col * ld_out + 16 * m, acc[m][f], ld_out, wmma::mem_col_major);
          } else {
            wmma::store_matrix_sync(out_stage + 16 * m * ld_out + col, acc[m][f], ld_out, wmma::mem_row_major);
          }
        }
      }
    }
    __syncthreads();
    store_tile<T, BM, kTileN>(out + (n0 + s0) * o_cs, o_rs, o_cs, out_stage, ld_out, stage_col_major, out_rows,
                              cols - n0 - s0);
  }
}

// out[BM x cols_padded] (fp32, shared) = A[BM x depth] * B[b_rows x depth]^T, both operands global.
// A is the block's query tile (a_rows valid), B the keys (b_rows valid); columns b_rows..cols_padded
// come out zero. Warp w owns columns [32w, 32w + 32) of each 128-column pass and all BM rows.
//
// kGlobalOrientation: both operands are channel-first (stride 1 along their rows: N for A, S for B), and their
// tiles keep that orientation in shared memory, A as [k][m] (a col_major matrix_a) and B as [k][n] (a row_major
// matrix_b), so they arrive in 16-byte stores. Otherwise A is [m][k] and B [n][k], and a channel-first operand is
// stored column by column (load_tile), one entry per lane per store.
template <typename T, int BM, bool kGlobalOrientation>
__device__ void gemm_abt_to_smem(const T* a, int64_t a_rs, int64_t a_cs, int a_rows, const T* b, int64_t b_rs,
                                 int64_t b_cs, int b_rows, int depth, int cols_padded, float* out, int ld_out,
                                 T* stage) {
  using M = Mma<T>;
  using LayoutA = std::conditional_t<kGlobalOrientation, wmma::col_major, wmma::row_major>;
  using LayoutB = std::conditional_t<kGlobalOrientation, wmma::row_major, wmma::col_major>;
  constexpr int ld_a = kGlobalOrientation ? BM + kPad<T> : kChunkK + kPad<T>;
  constexpr int ld_b = kGlobalOrientation ? kTileN + kPad<T> : kChunkK + kPad<T>;
  T* a_tile = stage;
  T* b_tile = stage + (kGlobalOrientation ? kChunkK : BM) * ld_a;
  for (int n0 = 0; n0 < cols_padded; n0 += kTileN) {
    WarpAccumulators<T, BM> acc;
    zero_accumulators<T, BM>(acc);
    for (int k0 = 0; k0 < depth; k0 += kChunkK) {
      __syncthreads();  // the previous tiles are no longer read
      const T* a_chunk = a + k0 * a_cs;
      const T* b_chunk = b + n0 * b_rs + k0 * b_cs;
      if constexpr (kGlobalOrientation) {
        load_tile<T, kChunkK, BM>(a_tile, ld_a, a_chunk, a_cs, a_rs, depth - k0, a_rows, [&] {
          load_tile<T, kChunkK, kTileN>(b_tile, ld_b, b_chunk, b_cs, b_rs, depth - k0, b_rows - n0);
        });
      } else {
        load_tile<T, BM, kChunkK>(a_tile, ld_a, a_chunk, a_rs, a_cs, a_rows, depth - k0, [&] {
          load_tile<T, kTileN, kChunkK>(b_tile, ld_b, b_chunk, b_rs, b_cs, b_rows - n0, depth - k0);
        });
      }
      __syncthreads();
      const int k_end = min(kChunkK, static_cast<int>(round_up(depth - k0, M::kK)));
      for (int kk = 0; kk < k_end; kk += M::kK) {
        mma_k_step<T, BM, LayoutA, LayoutB>(acc, a_tile + (kGlobalOrientation ? kk * ld_a : kk), ld_a, n0,
                                            cols_padded, [&](auto& b_frag, int col) {
          M::load(b_frag, b_tile + (kGlobalOrientation ? kk * ld_b + col : col * ld_b + kk), ld_b);
        });
      }
    }
    store_score_tile<T, BM>(acc, out, ld_out, n0, cols_padded);
  }
}

// gemm_abt_to_smem in global orientation when both operands are channel-first (one branch per block).
template <typename T, int BM>
__device__ void scores_product(const T* a, int64_t a_rs, int64_t a_cs, int a_rows, const T* b, int64_t b_rs,
                               int64_t b_cs, int b_rows, int depth, int cols_padded, float* out, int ld_out,
                               T* stage) {
  if (rows_contiguous(a_rs, a_cs) && rows_contiguous(b_rs, b_cs)) {
    gemm_abt_to_smem<T, BM, true>(a, a_rs, a_cs, a_rows, b, b_rs, b_cs, b_rows, depth, cols_padded, out, ld_out,
                                  stage);
  } else {
    gemm_abt_to_smem<T, BM, false>(a, a_rs, a_cs, a_rows, b, b_rs, b_cs, b_rows, depth, cols_padded, out, ld_out,
                                   stage);
  }
}

// out[BM x cols] (global, strided; out_rows valid) = A[BM x depth_padded] * B[b_rows x cols], where A is
// in shared memory (row-major, ld_a) and B global (rows b_rows..depth_padded read as zero). kGlobalOrientation:
// B is channel-first (stride 1 along its rows, the keys) and its tile stays [n][k] in shared memory (a col_major
// matrix_b, filled by 16-byte stores); otherwise [k][n].
template <typename T, int BM, bool kGlobalOrientation>
__device__ void gemm_ab_to_global(const T* a, int ld_a, int depth_padded, const T* b, int64_t b_rs, int64_t b_cs,
                                  int b_rows, int cols, T* out, int64_t o_rs, int64_t o_cs, int out_rows, T* stage) {
  using M = Mma<T>;
  using LayoutB = std::conditional_t<kGlobalOrientation, wmma::col_major, wmma::row_major>;
  constexpr int ld_b = kGlobalOrientation ? kChunkS + kPad<T> : kTileN + kPad<T>;
  T* b_tile = stage;
  float* out_stage = reinterpret_cast<float*>(stage);  // reused once the products are done
  for (int n0 = 0; n0 < cols; n0 += kTileN) {
    WarpAccumulators<T, BM> acc;
    zero_accumulators<T, BM>(acc);
    for (int k0 = 0; k0 < depth_padded; k0 += kChunkS) {
      __syncthreads();
      const T* b_chunk = b + k0 * b_rs + n0 * b_cs;
      if constexpr (kGlobalOrientation) {
        load_tile<T, kTileN, kChunkS>(b_tile, ld_b, b_chunk, b_cs, b_rs, cols - n0, b_rows - k0);
      } else {
        load_tile<T, kChunkS, kTileN>(b_tile, ld_b, b_chunk, b_rs, b_cs, b_rows - k0, cols - n0);
      }
      __syncthreads();
      const int k_end = min(kChunkS, depth_padded - k0);
      for (int kk = 0; kk < k_end; kk += M::kK) {
        mma_k_step<T, BM, wmma::row_major, LayoutB>(acc, a + k0 + kk, ld_a, n0, cols, [&](auto& b_frag, int col) {
          M::load(b_frag, b_tile + (kGlobalOrientation ? col * ld_b + kk : kk * ld_b + col), ld_b);
        });
      }
    }
    write_output_tile<T, BM>(acc, out_stage, n0, cols, out, o_rs, o_cs, out_rows);  // out_stage overlays b_tile
  }
}

// gemm_ab_to_global in global orientation when B is channel-first (one branch per block).
template <typename T, int BM>
__device__ void output_product(const T* a, int ld_a, int depth_padded, const T* b, int64_t b_rs, int64_t b_cs,
                               int b_rows, int cols, T* out, int64_t o_rs, int64_t o_cs, int out_rows, T* stage) {
  if (rows_contiguous(b_rs, b_cs)) {
    gemm_ab_to_global<T, BM, true>(a, ld_a, depth_padded, b, b_rs, b_cs, b_rows, cols, out, o_rs, o_cs, out_rows,
                                   stage);
  } else {
    gemm_ab_to_global<T, BM, false>(a, ld_a, depth_padded, b, b_rs, b_cs, b_rows, cols, out, o_rs, o_cs, out_rows,
                                    stage);
  }
}

// Exponentiates a score row in place, once per entry: x_j = row[j] * scale_log2 for j < keys, row[j] becomes
// exp2(x_j - maximum); every lane of the warp gets the maximum and the reciprocal of the sum of those. Each
// lane reads and writes only its own entries, so the row needs no barrier. P_j = row[j] * reciprocal: the
// largest P is exactly 1 when one key dominates, however large the scores, which a P rebuilt from the
// log-sum-exp (about 1e3 for large scores, so its fp32 rounding shifts every exponent) would not give.
struct RowStats {
  float maximum;
  float sum;
  float reciprocal;
};

__device__ __forceinline__ RowStats exponentiate_row(float* row, int keys, float scale_log2, int lane) {
  float maximum = -INFINITY;
  for (int j = lane; j < keys; j += kWarpSize) {
    maximum = fmaxf(maximum, row[j] * scale_log2);
  }
  maximum = warp_max(maximum);
  float sum = 0.0f;
  for (int j = lane; j < keys; j += kWarpSize) {
    const float e = exp2f(row[j] * scale_log2 - maximum);
    row[j] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  return {maximum, sum, 1.0f / sum};
}

// A score row held in registers, entries j = lane + 32 i (i < kPerLane): read from shared memory once, where
// exponentiate_row reads it twice and writes it once. load_exponentiated() returns the stats exponentiate_row
// would, by the same operations in the same order (so P comes out bit for bit the same), and leaves
// exp2(x_j - maximum) in e[i].
template <int kPerLane>
struct RowInRegisters {
  float e[kPerLane];

  __device__ __forceinline__ RowStats load_exponentiated(const float* row, int keys, float scale_log2, int lane) {
    float maximum = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int j = lane + i * kWarpSize;
      e[i] = j < keys ? row[j] * scale_log2 : 0.0f;
      maximum = j < keys ? fmaxf(maximum, e[i]) : maximum;
    }
    maximum = warp_max(maximum);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (lane + i * kWarpSize < keys) {
        e[i] = exp2f(e[i] - maximum);
        sum += e[i];
      }
    }
    sum = warp_sum(sum);
    return {maximum, sum, 1.0f / sum};
  }
};

// Calls body(RowInRegisters<k>{}) with the fewest entries per lane that hold keys_padded scores (4 for S <= 128,
// 8 for S <= 256), or body_in_shared() for longer rows.
template <typename Body, typename BodyInShared>
__device__ __forceinline__ void with_row_registers(int keys_padded, Body body, BodyInShared body_in_shared) {
  if (keys_padded <= 4 * kWarpSize) {
    body(RowInRegisters<4>{});
  } else if (keys_padded <= 8 * kWarpSize) {
    body(RowInRegisters<8>{});
  } else {
    body_in_shared();
  }
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
    float* row = scores + r * ld_s;
    T* prob = reinterpret_cast<T*>(scores) + r * ld_p;
    const auto write_lse = [&](const RowStats& stats) {
      if (lane == 0 && r < rows_valid) {
        lse[r] = (stats.maximum + log2f(stats.sum)) * kLn2;
      }
    };
    with_row_registers(
        keys_padded,
        [&](auto values) {
          const RowStats stats = values.load_exponentiated(row, keys, scale_log2, lane);
          write_lse(stats);
          __syncwarp();  // the whole row is read before P overwrites it
          constexpr int kPerLane = sizeof(values.e) / sizeof(float);
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            const int j = lane + i * kWarpSize;
            if (j < keys_padded) {
              prob[j] = from_acc<T>(j < keys ? values.e[i] * stats.reciprocal : 0.0f);
            }
          }
        },
        [&] {
          const RowStats stats = exponentiate_row(row, keys, scale_log2, lane);
          write_lse(stats);
          for (int j0 = 0; j0 < keys_padded; j0 += kWarpSize) {
            const int j = j0 + lane;
            const float p = j < keys ? row[j] * stats.reciprocal : 0.0f;
            __syncwarp();
            if (j < keys_padded) {
              prob[j] = from_acc<T>(p);
            }
            __syncwarp();
          }
        });
  }
}

// Backward of the softmax, in place: P (recomputed from the score row exactly as the forward computes it)
// replaces the score row and dS = P * (dP - sum_j P_j dP_j) * scale replaces the dP row (both in T, same
// aliasing as softmax_rows). sum_j P_j dP_j equals rowsum(dO * O) but comes from the fp32 tile, so `out`
// is not read. Rows past the last query get P = dS = 0, so the key/value kernel reads zeros there.
template <typename T, int BM>
__device__ void softmax_backward_rows(float* scores, float* dprob, int ld_s, int keys, int keys_padded, float scale,
                                      int rows_valid) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int ld_p = ld_s * static_cast<int>(sizeof(float) / sizeof(T));
  const float scale_log2 = scale * kLog2e;
  for (int r = warp; r < BM; r += kWarps) {
    const bool valid = r < rows_valid;
    float* s_row = scores + r * ld_s;
    const float* dp_row = dprob + r * ld_s;
    T* p_out = reinterpret_cast<T*>(scores) + r * ld_p;
    T* ds_out = reinterpret_cast<T*>(dprob) + r * ld_p;
    with_row_registers(
        keys_padded,
        [&](auto values) {
          constexpr int kPerLane = sizeof(values.e) / sizeof(float);
          const RowStats stats = values.load_exponentiated(s_row, keys, scale_log2, lane);
          float dp[kPerLane];
          float delta = 0.0f;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            const int j = lane + i * kWarpSize;
            dp[i] = j < keys ? dp_row[j] : 0.0f;
            if (valid && j < keys) {
              delta += values.e[i] * stats.reciprocal * dp[i];
            }
          }
          delta = warp_sum(delta);
          __syncwarp();  // both rows are read before P and dS overwrite them
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            const int j = lane + i * kWarpSize;
            float p = 0.0f;
            float ds = 0.0f;
            if (valid && j < keys) {
              p = values.e[i] * stats.reciprocal;
              ds = p * (dp[i] - delta) * scale;
            }
            if (j < keys_padded) {
              p_out[j] = from_acc<T>(p);
              ds_out[j] = from_acc<T>(ds);
            }
          }
        },
        [&] {
          const RowStats stats = exponentiate_row(s_row, keys, scale_log2, lane);
          float delta = 0.0f;
          if (valid) {
            for (int j = lane; j < keys; j += kWarpSize) {
              delta += s_row[j] * stats.reciprocal * dp_row[j];
            }
          }
          delta = warp_sum(delta);
          for (int j0 = 0; j0 < keys_padded; j0 += kWarpSize) {
            const int j = j0 + lane;
            float p = 0.0f;
            float ds = 0.0f;
            if (valid && j < keys) {
              p = s_row[j] * stats.reciprocal;
              ds = p * (dp_row[j] - delta) * scale;
            }
            __syncwarp();
            if (j < keys_padded) {
              p_out[j] = from_acc<T>(p);
              ds_out[j] = from_acc<T>(ds);
            }
            __syncwarp();
          }
        });
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
__global__ void __launch_bounds__(kThreads, 2) short_attention_forward_kernel(ForwardParams p) {
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

  scores_product<T, BM>(query, p.query.row_stride, p.query.col_stride, rows_valid, key, p.key.row_stride,
                          p.key.col_stride, p.keys, p.key_dim, keys_padded, scores, ld_s, stage);
  __syncthreads();
  softmax_rows<T, BM>(scores, ld_s, p.keys, keys_padded, p.scale,
                      p.lse + static_cast<int64_t>(b) * p.queries + row0, rows_valid);
  __syncthreads();
  const int ld_p = ld_s * static_cast<int>(sizeof(float) / sizeof(T));
  output_product<T, BM>(reinterpret_cast<const T*>(scores), ld_p, keys_padded, value, p.value.row_stride,
                           p.value.col_stride, p.keys, p.value_dim, out, p.out.row_stride, p.out.col_stride,
                           rows_valid, stage);
}

// The persistent forward keeps its batch's K and V in shared memory for all its query tiles, as [channel][key] rows
// of kTileN keys (so S <= 128, ANN's 110 included), and streams each 64-row query tile through two 64-deep
// chunk buffers, [channel][query] like the channel-first Q they copy.
constexpr int kResidentRows = 64;
template <typename T>
constexpr int kResidentLd = kTileN + kPad<T>;
template <typename T>
constexpr int kQueryChunkLd = kResidentRows + kPad<T>;
template <typename T>
constexpr size_t kQueryChunkBytes = align128(static_cast<size_t>(kChunkK) * kQueryChunkLd<T> * sizeof(T));

// Byte offsets of the persistent forward's shared memory: fp32 score rows at 0 (P in place), then K, V, the two
// query chunk buffers and the fp32 output stage (in either orientation).
struct ResidentLayout {
  size_t keys, values, query_chunks, out_stage, total;
};

template <typename T>
__host__ __device__ constexpr ResidentLayout resident_layout(int keys_padded, int64_t key_dim, int64_t value_dim) {
  const size_t scores = align128(static_cast<size_t>(kResidentRows) * score_ld(keys_padded) * sizeof(float));
  const size_t keys = align128(static_cast<size_t>(round_up(key_dim, kChunkK)) * kResidentLd<T> * sizeof(T));
  const size_t values = align128(static_cast<size_t>(round_up(value_dim, kChunkK)) * kResidentLd<T> * sizeof(T));
  const size_t query_chunks = scores + keys + values;
  return {scores, scores + keys, query_chunks, query_chunks + 2 * kQueryChunkBytes<T>,
          query_chunks + 2 * kQueryChunkBytes<T> + output_stage_bytes<kResidentRows>()};
}

// Persistent forward for channel-first Q, K and V. Grid: (blocks per batch, B), at most one block per SM; block x
// takes its batch's query tiles x, x + gridDim.x, ... and loads K and V once for all of them. Its query chunks
// (every tile's, in turn) stream through two buffers by asynchronous copies: chunk g + 2 is issued as soon as
// chunk g has been read, so a tile's first two chunks land while the tile before it runs its softmax and output
// product. K and V are copied asynchronously too, in 16-byte vectors or 4-byte words (S = 110 rows are 220
// bytes), all in flight at once. Each tile's arithmetic is short_attention_forward_kernel's at 64 rows, in the
// same order, so the two give the same bits.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) short_attention_forward_resident_kernel(ForwardParams p) {
  using M = Mma<T>;
  constexpr int BM = kResidentRows;
  constexpr int ld_r = kResidentLd<T>;
  constexpr int ld_q = kQueryChunkLd<T>;
  constexpr int kChunkElements = static_cast<int>(kQueryChunkBytes<T> / sizeof(T));
  // The output product takes 256 columns per pass (Dv = 256 in one), each warp 64 of them: every warp reads all
  // of P's fragments for each pass, so one pass reads P half as often as two of kTileN.
  constexpr int kOutputFragsN = 2 * kFragsN;
  constexpr int kOutputPassN = kWarps * kOutputFragsN * 16;
  extern __shared__ __align__(128) unsigned char smem[];
  const int keys_padded = static_cast<int>(round_up(p.keys, 16));
  const int ld_s = score_ld(keys_padded);
  const int ld_p = ld_s * static_cast<int>(sizeof(float) / sizeof(T));
  const ResidentLayout layout = resident_layout<T>(keys_padded, p.key_dim, p.value_dim);
  float* scores = reinterpret_cast<float*>(smem);
  T* keys = reinterpret_cast<T*>(smem + layout.keys);
  T* values = reinterpret_cast<T*>(smem + layout.values);
  T* query_chunks = reinterpret_cast<T*>(smem + layout.query_chunks);
  float* out_stage = reinterpret_cast<float*>(smem + layout.out_stage);

  const int b = blockIdx.y;
  const int tiles = static_cast<int>(ceil_div(p.queries, BM));
  const int chunks = static_cast<int>(ceil_div(p.key_dim, kChunkK));
  const int tiles_here = static_cast<int>(ceil_div(tiles - static_cast<int>(blockIdx.x), gridDim.x));
  const int stream = tiles_here * chunks;  // query chunks through this block
  const T* query = static_cast<const T*>(p.query.data) + b * p.query.batch_stride;
  const T* key = static_cast<const T*>(p.key.data) + b * p.key.batch_stride;
  const T* value = static_cast<const T*>(p.value.data) + b * p.value.batch_stride;
  const auto tile_row0 = [&](int g) { return (static_cast<int>(blockIdx.x) + g / chunks * gridDim.x) * BM; };
  // Batch g of this thread's asynchronous copies holds query chunk g (batch 0 also K and V).
  const auto issue = [&](int g) {
    const int row0 = tile_row0(g);
    const int k0 = g % chunks * kChunkK;
    copy_tile_async<T, kChunkK, BM>(query_chunks + g % 2 * kChunkElements, ld_q,
                                    query + row0 * p.query.row_stride + k0 * p.query.col_stride,
                                    p.query.col_stride, p.key_dim - k0, min(BM, p.queries - row0));
    __pipeline_commit();
  };
  for (int c0 = 0; c0 < p.key_dim; c0 += kChunkK) {
    copy_tile_async<T, kChunkK, kTileN>(keys + c0 * ld_r, ld_r, key + c0 * p.key.col_stride, p.key.col_stride,
                                        p.key_dim - c0, p.keys);
  }
  for (int c0 = 0; c0 < p.value_dim; c0 += kChunkK) {
    copy_tile_async<T, kChunkK, kTileN>(values + c0 * ld_r, ld_r, value + c0 * p.value.col_stride,
                                        p.value.col_stride, p.value_dim - c0, p.keys);
  }
  issue(0);
  if (stream > 1) {
    issue(1);
  }

  for (int tile = 0; tile < tiles_here; ++tile) {
    {
      WarpAccumulators<T, BM> acc;  // scoped to the scores, so the output product has its registers
      zero_accumulators<T, BM>(acc);
      for (int chunk = 0; chunk < chunks; ++chunk) {
        const int g = tile * chunks + chunk;
        const int k0 = chunk * kChunkK;
        __pipeline_wait_prior(g + 1 < stream ? 1 : 0);
        __syncthreads();  // every thread's copies of chunk g (and of K and V) have landed
        const T* query_chunk = query_chunks + g % 2 * kChunkElements;
        const int k_end = min(kChunkK, static_cast<int>(round_up(p.key_dim - k0, M::kK)));
        for (int kk = 0; kk < k_end; kk += M::kK) {
          mma_k_step<T, BM, wmma::col_major, wmma::row_major>(acc, query_chunk + kk * ld_q, ld_q, 0, keys_padded,
                                                              [&](auto& b_frag, int col) {
            M::load(b_frag, keys + (k0 + kk) * ld_r + col, ld_r);
          });
        }
        __syncthreads();  // chunk g's buffer has been read: chunk g + 2 may take it
        if (g + 2 < stream) {
          issue(g + 2);
        }
      }
      store_score_tile<T, BM>(acc, scores, ld_s, 0, keys_padded);
    }
    const int row0 = tile_row0(tile * chunks);
    const int rows_valid = min(BM, p.queries - row0);
    __syncthreads();
    softmax_rows<T, BM>(scores, ld_s, p.keys, keys_padded, p.scale,
                        p.lse + static_cast<int64_t>(b) * p.queries + row0, rows_valid);
    __syncthreads();
    const T* prob = reinterpret_cast<const T*>(scores);
    T* out = static_cast<T*>(p.out.data) + b * p.out.batch_stride + row0 * p.out.row_stride;
    for (int n0 = 0; n0 < p.value_dim; n0 += kOutputPassN) {
      WarpAccumulators<T, BM, kOutputFragsN> acc;
      zero_accumulators<T, BM, kOutputFragsN>(acc);
      for (int kk = 0; kk < keys_padded; kk += M::kK) {
        mma_k_step<T, BM, wmma::row_major, wmma::col_major, kOutputFragsN>(acc, prob + kk, ld_p, n0, p.value_dim,
                                                                           [&](auto& b_frag, int col) {
          M::load(b_frag, values + (n0 + col) * ld_r + kk, ld_r);
        });
      }
      write_output_tile<T, BM, kOutputFragsN>(acc, out_stage, n0, p.value_dim, out, p.out.row_stride,
                                              p.out.col_stride, rows_valid);
    }
  }
}

struct BackwardParams {
  ConstView3 grad_out, query, key, value;
  View3 grad_query;
  void* prob;    // [B][N][keys_padded] in T
  void* dscore;  // [B][N][keys_padded] in T
  int queries, keys, key_dim, value_dim;
  float scale;
};

// Backward, first kernel. Grid: (ceil(N / BM), B). Per query tile: scores = q k^T and dP = dO v^T into two
// fp32 buffers, the softmax backward in place (P, dS*scale in T), dQ = dS k written directly, and P and dS
// copied to the workspace for the key/value kernel.
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads, 2) short_attention_backward_scores_kernel(BackwardParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int keys_padded = static_cast<int>(round_up(p.keys, 16));
  const int ld_s = score_ld(keys_padded);
  const int ld_p = ld_s * static_cast<int>(sizeof(float) / sizeof(T));
  const size_t score_bytes = align128(static_cast<size_t>(BM) * ld_s * sizeof(float));
  float* scores = reinterpret_cast<float*>(smem);
  float* dprob = reinterpret_cast<float*>(smem + score_bytes);
  T* stage = reinterpret_cast<T*>(smem + 2 * score_bytes);

  const int b = blockIdx.y;
  const int row0 = blockIdx.x * BM;
  const int rows_valid = min(BM, p.queries - row0);
  const T* key = static_cast<const T*>(p.key.data) + b * p.key.batch_stride;
  const T* value = static_cast<const T*>(p.value.data) + b * p.value.batch_stride;
  const T* query = static_cast<const T*>(p.query.data) + b * p.query.batch_stride + row0 * p.query.row_stride;
  const T* grad_out =
      static_cast<const T*>(p.grad_out.data) + b * p.grad_out.batch_stride + row0 * p.grad_out.row_stride;
  T* grad_query = static_cast<T*>(p.grad_query.data) + b * p.grad_query.batch_stride + row0 * p.grad_query.row_stride;

  scores_product<T, BM>(query, p.query.row_stride, p.query.col_stride, rows_valid, key, p.key.row_stride,
                          p.key.col_stride, p.keys, p.key_dim, keys_padded, scores, ld_s, stage);
  scores_product<T, BM>(grad_out, p.grad_out.row_stride, p.grad_out.col_stride, rows_valid, value,
                          p.value.row_stride, p.value.col_stride, p.keys, p.value_dim, keys_padded, dprob, ld_s,
                          stage);
  __syncthreads();
  softmax_backward_rows<T, BM>(scores, dprob, ld_s, p.keys, keys_padded, p.scale, rows_valid);
  __syncthreads();
  const T* prob = reinterpret_cast<const T*>(scores);
  const T* dscore = reinterpret_cast<const T*>(dprob);
  // P and dS rows to the workspace in 16-byte stores (keys_padded * sizeof(T) is a multiple of 32 bytes).
  const int vectors_per_row = keys_padded / kVec<T>;
  const int64_t workspace_row0 = (static_cast<int64_t>(b) * p.queries + row0) * keys_padded;
  for (int v = threadIdx.x; v < rows_valid * vectors_per_row; v += kThreads) {
    const int r = v / vectors_per_row;
    const int j = v % vectors_per_row * kVec<T>;
    const int64_t to = workspace_row0 + static_cast<int64_t>(r) * keys_padded + j;
    *reinterpret_cast<uint4*>(static_cast<T*>(p.prob) + to) = *reinterpret_cast<const uint4*>(prob + r * ld_p + j);
    *reinterpret_cast<uint4*>(static_cast<T*>(p.dscore) + to) =
        *reinterpret_cast<const uint4*>(dscore + r * ld_p + j);
  }
  output_product<T, BM>(dscore, ld_p, keys_padded, key, p.key.row_stride, p.key.col_stride, p.keys, p.key_dim,
                           grad_query, p.grad_query.row_stride, p.grad_query.col_stride, rows_valid, stage);
}

// Tile of the key/value kernel: 64 keys by kKvColumns gradient columns, 64 queries deep per staged step. 128
// columns halve the re-reads of dS and P; fp32 keeps 64 so the two static tiles stay within 48 KiB.
constexpr int kKvTile = 64;
template <typename T>
constexpr int kKvColumns = sizeof(T) == 2 ? 128 : 64;

struct KeyValueParams {
  ConstView3 query, grad_out;
  const void* prob;    // [B][N][keys_padded] in T
  const void* dscore;  // [B][N][keys_padded] in T
  float* partial;      // [B][chunks][keys_padded][key_dim_padded + value_dim_padded]
  int queries, keys_padded, key_dim, value_dim, key_dim_padded, value_dim_padded;
  int rows_per_chunk, column_tiles, key_column_tiles;
};

// Backward, second kernel: [dK | dV] = [dS | P]^T [q | dO] split over the queries. Grid: (key tiles x column
// tiles, chunks, B). A block owns a 64 x kKvColumns tile of [dK | dV] (dK's columns first) for one chunk of
// rows_per_chunk queries and writes its fp32 partial sum; warp w owns the tile's keys [16w, 16w + 16). Each
// step stages 64 queries of both operands (dS or P rows as they lie, q or dO in its own layout).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) short_attention_backward_key_value_kernel(KeyValueParams p) {
  using M = Mma<T>;
  constexpr int kColumns = kKvColumns<T>;
  constexpr int kFrags = kColumns / 16;
  constexpr int ld = kKvTile + kPad<T>;
  constexpr int ld_b = kColumns + kPad<T>;
  __shared__ __align__(128) T a_tile[kKvTile * ld];     // [query][key]
  __shared__ __align__(128) T b_tile[kKvTile * ld_b];  // [query][column]

  const int key_tile = blockIdx.x / p.column_tiles;
  const int column_tile = blockIdx.x % p.column_tiles;
  const int chunk = blockIdx.y;
  const int b = blockIdx.z;
  const bool is_key = column_tile < p.key_column_tiles;
  const int s0 = key_tile * kKvTile;
  const int d0 = (is_key ? column_tile : column_tile - p.key_column_tiles) * kColumns;
  const int dim = is_key ? p.key_dim : p.value_dim;
  const int dim_padded = is_key ? p.key_dim_padded : p.value_dim_padded;
  const ConstView3 rhs = is_key ? p.query : p.grad_out;
  const int row_begin = chunk * p.rows_per_chunk;
  const int row_end = min(p.queries, row_begin + p.rows_per_chunk);
  const T* lhs = static_cast<const T*>(is_key ? p.dscore : p.prob) +
                 (static_cast<int64_t>(b) * p.queries + row_begin) * p.keys_padded + s0;
  const T* rhs_data = static_cast<const T*>(rhs.data) + b * rhs.batch_stride + row_begin * rhs.row_stride +
                      d0 * rhs.col_stride;
  const int warp = threadIdx.x / kWarpSize;
  const bool warp_has_keys = s0 + 16 * warp < p.keys_padded;

  typename M::Acc acc[kFrags];
#pragma unroll
  for (int f = 0; f < kFrags; ++f) {
    wmma::fill_fragment(acc[f], 0.0f);
  }
  for (int n0 = 0; n0 < row_end - row_begin; n0 += kKvTile) {
    __syncthreads();  // the previous step's tiles are no longer read
    load_tile<T, kKvTile, kKvTile>(a_tile, ld, lhs + static_cast<int64_t>(n0) * p.keys_padded, p.keys_padded, 1,
                                   row_end - row_begin - n0, p.keys_padded - s0, [&] {
                                     load_tile<T, kKvTile, kColumns>(b_tile, ld_b, rhs_data + n0 * rhs.row_stride,
                                                                     rhs.row_stride, rhs.col_stride,
                                                                     row_end - row_begin - n0, dim - d0);
                                   });
    __syncthreads();
    if (warp_has_keys) {
#pragma unroll
      for (int kk = 0; kk < kKvTile; kk += M::kK) {
        // (dS)^T as a column-major view of the [query][key] tile: element (s, n) is a_tile[n * ld + s].
        typename M::template A<wmma::col_major> a_frag;
        M::load(a_frag, a_tile + kk * ld + 16 * warp, ld);
#pragma unroll
        for (int f = 0; f < kFrags; ++f) {
          if (d0 + 16 * f < dim_padded) {
            typename M::template B<wmma::row_major> b_frag;
            M::load(b_frag, b_tile + kk * ld_b + 16 * f, ld_b);
            M::mma(acc[f], a_frag, b_frag);
          }
        }
      }
    }
  }
  if (warp_has_keys) {
    const int ld_partial = p.key_dim_padded + p.value_dim_padded;
    float* dst = p.partial +
                 ((static_cast<int64_t>(b) * gridDim.y + chunk) * p.keys_padded + s0 + 16 * warp) * ld_partial +
                 (is_key ? 0 : p.key_dim_padded) + d0;
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
      if (d0 + 16 * f < dim_padded) {
        wmma::store_matrix_sync(dst + 16 * f, acc[f], ld_partial, wmma::mem_row_major);
      }
    }
  }
}

// Partial sums added per thread at a time: their loads are in flight together.
constexpr int kReduceBatch = 8;
// One output element per thread; 128-thread blocks split dK and dV finely enough to launch a block per SM
// (220 blocks at B=1, S=110, D=256, where 256 threads gave 110 for 132 SMs).
constexpr int kReduceThreads = 128;

// dK or dV: out[b, s, d] = sum over chunks c (in order) of partial[b][c][s][column0 + d]. One thread per
// output element, d fastest so the partial reads are coalesced; the fixed order makes the result bitwise
// reproducible.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_chunks_kernel(const float* __restrict__ partial, int chunks, int rows, int cols, int rows_padded, int ld,
                         int column0, int64_t total, View3 out) {
  T* dst = static_cast<T*>(out.data);
  const int64_t slot_elems = static_cast<int64_t>(rows_padded) * ld;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(index % cols);
    const int s = static_cast<int>((index / cols) % rows);
    const int64_t b = index / (static_cast<int64_t>(cols) * rows);
    const float* src = partial + b * chunks * slot_elems + static_cast<int64_t>(s) * ld + column0 + d;
    float sum = 0.0f;
    for (int c0 = 0; c0 < chunks; c0 += kReduceBatch) {
      float values[kReduceBatch];
#pragma unroll
      for (int i = 0; i < kReduceBatch; ++i) {
        values[i] = c0 + i < chunks ? src[(c0 + i) * slot_elems] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kReduceBatch; ++i) {
        sum += values[i];
      }
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

// Blocks per batch of the persistent forward, or 0 where it does not apply: Q, K and V must be channel-first (the
// views the ANN blocks pass), S at most kTileN, its shared memory within the device's (bf16 and fp16 with
// Dk = Dv = 256 take 217 KiB: an H100 or H200, not an A100; fp32 at that size does not fit), and some block must
// get two tiles or more (with one each, the tiled plan's two blocks per SM do the same work with more warps).
template <typename T>
int resident_blocks_per_batch(const AttentionShape& shape, const ForwardParams& params, int sm_count, int max_smem) {
  const int keys_padded = static_cast<int>(round_up(shape.keys, 16));
  const bool channel_first = rows_contiguous(params.query.row_stride, params.query.col_stride) &&
                             rows_contiguous(params.key.row_stride, params.key.col_stride) &&
                             rows_contiguous(params.value.row_stride, params.value.col_stride);
  if (!channel_first || keys_padded > kTileN ||
      resident_layout<T>(keys_padded, shape.key_dim, shape.value_dim).total > static_cast<size_t>(max_smem)) {
    return 0;
  }
  const int64_t blocks = std::max<int64_t>(1, sm_count / shape.batch);
  return ceil_div(shape.queries, kResidentRows) > blocks ? static_cast<int>(blocks) : 0;
}

template <typename T>
cudaError_t launch_forward_resident(const AttentionShape& shape, const ForwardParams& params, int blocks_per_batch,
                                    cudaStream_t stream) {
  const size_t smem =
      resident_layout<T>(static_cast<int>(round_up(shape.keys, 16)), shape.key_dim, shape.value_dim).total;
  cudaError_t status = allow_dynamic_smem(short_attention_forward_resident_kernel<T>, smem);
  if (status != cudaSuccess) {
    return status;
  }
  const dim3 grid(static_cast<unsigned>(blocks_per_batch), static_cast<unsigned>(shape.batch));
  return launch_kernel<short_attention_forward_resident_kernel<T>>(grid, kThreads, smem, stream, params);
}

template <typename T>
cudaError_t launch_forward(const AttentionShape& shape, const ForwardParams& params, cudaStream_t stream) {
  int sm_count = 0;
  int max_smem = 0;
  cudaError_t status = device_limits(&sm_count, &max_smem);
  if (status != cudaSuccess) {
    return status;
  }
  if (const int blocks_per_batch = resident_blocks_per_batch<T>(shape, params, sm_count, max_smem)) {
    return launch_forward_resident<T>(shape, params, blocks_per_batch, stream);
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

constexpr int64_t align256(int64_t bytes) { return round_up(bytes, 256); }

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
  const int64_t key_dim_padded = round_up(shape.key_dim, 16);
  const int64_t value_dim_padded = round_up(shape.value_dim, 16);
  // Key/value blocks: chunks of whole 64-query steps, as many chunks as keep to one block per SM (rounded
  // down: 144 blocks on 132 SMs would give 12 SMs two blocks' shared-memory work, and the launch their time),
  // and at least two steps per chunk (a chunk's partial costs about one step's traffic); the fp32 partials
  // (chunks x S_pad x (Dk + Dv) per image, about 4 MB at B=2, S=110, Dk=Dv=256) stay L2-sized.
  constexpr int kKeyValueBlocksPerSm = 1;
  constexpr int kMinStepsPerChunk = 2;
  const int64_t tiles_per_chunk = ceil_div(keys_padded, kKvTile) *
                                  (ceil_div(key_dim_padded, kKvColumns<T>) + ceil_div(value_dim_padded, kKvColumns<T>)) *
                                  shape.batch;
  const int64_t steps = ceil_div(shape.queries, kKvTile);
  const int64_t wanted_chunks = std::min<int64_t>(
      std::min<int64_t>(ceil_div(steps, kMinStepsPerChunk), 65535),
      std::max<int64_t>(1, kKeyValueBlocksPerSm * sm_count / tiles_per_chunk));
  const int64_t rows_per_chunk = ceil_div(steps, wanted_chunks) * kKvTile;
  const int64_t chunks = ceil_div(shape.queries, rows_per_chunk);
  const int64_t score_bytes = align256(shape.batch * shape.queries * keys_padded * static_cast<int64_t>(sizeof(T)));
  const int64_t partial_bytes =
      shape.batch * chunks * keys_padded * (key_dim_padded + value_dim_padded) * static_cast<int64_t>(sizeof(float));
  plan->block_m = block_m;
  plan->keys_padded = keys_padded;
  plan->key_dim_padded = key_dim_padded;
  plan->value_dim_padded = value_dim_padded;
  plan->chunks = chunks;
  plan->rows_per_chunk = rows_per_chunk;
  plan->dscore_offset = score_bytes;
  plan->partial_offset = 2 * score_bytes;
  plan->workspace_bytes = 2 * score_bytes + partial_bytes;
  plan->smem_bytes = static_cast<int64_t>(smem);
  return cudaSuccess;
}

template <typename T, int BM>
cudaError_t launch_backward_scores(const AttentionShape& shape, const AttentionBackwardPlan& plan,
                                   const BackwardParams& params, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  cudaError_t status = allow_dynamic_smem(short_attention_backward_scores_kernel<T, BM>, smem);
  if (status != cudaSuccess) {
    return status;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(shape.queries, BM)), static_cast<unsigned>(shape.batch));
  return launch_kernel<short_attention_backward_scores_kernel<T, BM>>(grid, kThreads, smem, stream, params);
}

template <typename T>
cudaError_t launch_reduce(const float* partial, const AttentionShape& shape, const AttentionBackwardPlan& plan,
                          int cols, int column0, View3 out, cudaStream_t stream) {
  const int64_t total = shape.batch * shape.keys * cols;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kReduceThreads), 65535));
  return launch_kernel<reduce_chunks_kernel<T>>(blocks, kReduceThreads, 0, stream, partial,
                                                static_cast<int>(plan.chunks), static_cast<int>(shape.keys), cols,
                                                static_cast<int>(plan.keys_padded),
                                                static_cast<int>(plan.key_dim_padded + plan.value_dim_padded),
                                                column0, total, out);
}

template <typename T>
cudaError_t launch_backward(const AttentionShape& shape, const BackwardParams& params, View3 grad_key,
                            View3 grad_value, const AttentionBackwardPlan& plan, float* partial,
                            cudaStream_t stream) {
  cudaError_t status = cudaErrorInvalidValue;
  switch (plan.block_m) {
    case 64:
      status = launch_backward_scores<T, 64>(shape, plan, params, stream);
      break;
    case 16:
      status = launch_backward_scores<T, 16>(shape, plan, params, stream);
      break;
    default:
      break;
  }
  if (status != cudaSuccess) {
    return status;
  }
  const int key_column_tiles = static_cast<int>(ceil_div(plan.key_dim_padded, kKvColumns<T>));
  const int column_tiles = key_column_tiles + static_cast<int>(ceil_div(plan.value_dim_padded, kKvColumns<T>));
  const KeyValueParams kv{params.query,
                          params.grad_out,
                          params.prob,
                          params.dscore,
                          partial,
                          params.queries,
                          static_cast<int>(plan.keys_padded),
                          params.key_dim,
                          params.value_dim,
                          static_cast<int>(plan.key_dim_padded),
                          static_cast<int>(plan.value_dim_padded),
                          static_cast<int>(plan.rows_per_chunk),
                          column_tiles,
                          key_column_tiles};
  const dim3 grid(static_cast<unsigned>(ceil_div(plan.keys_padded, kKvTile) * column_tiles),
                  static_cast<unsigned>(plan.chunks), static_cast<unsigned>(shape.batch));
  status = launch_kernel<short_attention_backward_key_value_kernel<T>>(grid, kThreads, 0, stream, kv);
  if (status != cudaSuccess) {
    return status;
  }
  status = launch_reduce<T>(partial, shape, plan, params.key_dim, 0, grad_key, stream);
  if (status != cudaSuccess) {
    return status;
  }
  return launch_reduce<T>(partial, shape, plan, params.value_dim, static_cast<int>(plan.key_dim_padded), grad_value,
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
                                     ConstView3 key, ConstView3 value, float scale, View3 grad_query, View3 grad_key,
                                     View3 grad_value, const AttentionBackwardPlan& plan, void* workspace,
                                     cudaStream_t stream) {
  if (!valid_shape(shape)) {
    return cudaErrorInvalidValue;
  }
  unsigned char* bytes = static_cast<unsigned char*>(workspace);
  const BackwardParams params{grad_out,
                              query,
                              key,
                              value,
                              grad_query,
                              bytes,
                              bytes + plan.dscore_offset,
                              static_cast<int>(shape.queries),
                              static_cast<int>(shape.keys),
                              static_cast<int>(shape.key_dim),
                              static_cast<int>(shape.value_dim),
                              scale};
  float* partial = reinterpret_cast<float*>(bytes + plan.partial_offset);
  return dispatch_dtype<false>(dtype, [&](auto tag) {
    return launch_backward<typename decltype(tag)::type>(shape, params, grad_key, grad_value, plan, partial, stream);
  });
}

}  // namespace cuda_kernels
}  // namespace annkernels
