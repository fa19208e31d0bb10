// Pyramid pooling (concatenated adaptive average pools) on CUDA: one read of the input for all scales,
// a gather-style backward that writes every input gradient once without atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"
#include "pyramid_pool.h"

namespace annkernels {
namespace cuda_kernels {
namespace {

constexpr int kPoolThreads = 256;
constexpr int kPoolWarps = kPoolThreads / kWarpSize;
// Input staged per block, converted to the accumulation type.
constexpr int kTileBytes = 32 * 1024;
// Tile loads each thread keeps in flight.
constexpr int kLoadBatch = 16;

struct BinBox {
  int row_begin, row_end, col_begin, col_end;
};

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Static indices keep the kernel parameter out of local memory.
__device__ __forceinline__ void copy_sizes(const PyramidScales& scales, int* sizes) {
#pragma unroll
  for (int k = 0; k < kMaxPyramidScales; ++k) {
    sizes[k] = scales.sizes[k];
  }
}

// Geometry of bin q (scale order, then row-major inside a scale); sizes are the scales in shared
// memory (indexing the kernel parameter dynamically would copy it to local memory).
__device__ BinBox bin_box(const int* sizes, int q, int height, int width) {
  int offset = 0;
  int k = 0;
  while (q >= offset + sizes[k] * sizes[k]) {
    offset += sizes[k] * sizes[k];
    ++k;
  }
  const int s = sizes[k];
  const int i = (q - offset) / s;
  const int j = (q - offset) % s;
  return BinBox{adaptive_bin_start(i, height, s), adaptive_bin_end(i, height, s), adaptive_bin_start(j, width, s),
                adaptive_bin_end(j, width, s)};
}

// Forward. Grid: one block per (batch, group of `planes` consecutive channels). The block walks the
// planes in tiles of tile_rows x tile_cols pixels: each tile is loaded once into shared memory (threads
// run along whichever of channel / width is contiguous, so loads are coalesced for NCHW and for
// channels_last), then every (plane, bin) that intersects the tile is summed by one warp and added to
// that bin's running sum. The warp owning a (plane, bin) and the tile order are fixed, so the result
// is deterministic. Sums in Acc (fp32, or fp64 for fp64 input); output [B, C, S] contiguous.
//
// The launch bounds ask for 2 blocks per SM, a budget of 128 registers: left to itself ptxas keeps the kernel
// near 40 registers (6 blocks per SM) and gets there by interleaving a batch's loads with its shared stores
// (2-4 in flight); with the budget it issues all kLoadBatch loads first (about 90 registers used).
template <typename T>
__global__ void __launch_bounds__(kPoolThreads, 2)
    pyramid_pool_forward_kernel(const T* __restrict__ input, int channels, int height, int width, int64_t stride_b,
                                int64_t stride_c, int64_t stride_h, int64_t stride_w, PyramidScales scales,
                                int num_bins, int planes, int tile_rows, int tile_cols, T* __restrict__ output) {
  using Acc = typename AccumulateType<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  BinBox* boxes = reinterpret_cast<BinBox*>(smem);
  Acc* sums = reinterpret_cast<Acc*>(smem + align16(num_bins * sizeof(BinBox)));
  Acc* tile = reinterpret_cast<Acc*>(smem + align16(num_bins * sizeof(BinBox)) +
                                     align16(static_cast<size_t>(planes) * num_bins * sizeof(Acc)));
  // Odd plane stride: channels_last loads (consecutive threads -> consecutive planes) hit distinct banks.
  const int plane_stride = tile_rows * tile_cols + 1;

  const int groups_per_batch = static_cast<int>(ceil_div(channels, planes));
  const int b = blockIdx.x / groups_per_batch;
  const int c0 = (blockIdx.x % groups_per_batch) * planes;
  const int planes_valid = min(planes, channels - c0);

  __shared__ int sizes[kMaxPyramidScales];
  if (threadIdx.x == 0) {
    copy_sizes(scales, sizes);
  }
  __syncthreads();
  for (int q = threadIdx.x; q < num_bins; q += blockDim.x) {
    boxes[q] = bin_box(sizes, q, height, width);
  }
  for (int t = threadIdx.x; t < planes * num_bins; t += blockDim.x) {
    sums[t] = Acc(0);
  }

  const T* batch_input = input + b * stride_b + c0 * stride_c;
  const int plane = threadIdx.x % planes;
  const int pos_first = threadIdx.x / planes;
  const int pos_step = blockDim.x / planes;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  for (int h0 = 0; h0 < height; h0 += tile_rows) {
    const int rows = min(tile_rows, height - h0);
    for (int w0 = 0; w0 < width; w0 += tile_cols) {
      const int cols = min(tile_cols, width - w0);
      __syncthreads();  // the previous tile has been summed (first time: boxes and sums are ready)
      if (plane < planes_valid) {
        const T* src = batch_input + plane * stride_c;
        Acc* dst = tile + plane * plane_stride;
        // Walk this thread's pixels (pos_first, pos_first + pos_step, ...) in row-major tile order
        // without a division per element, kLoadBatch at a time: all of a batch's loads issue before its
        // first shared store, so they are in flight together. The loads are unconditional (a pixel past the
        // tile reads the tile's first pixel and is dropped), which keeps the batch straight-line code.
        int r = pos_first / cols;
        int c = pos_first % cols;
        const int step_r = pos_step / cols;
        const int step_c = pos_step % cols;
        const auto advance = [&](int& row, int& col) {
          col += step_c;
          const bool wrap = col >= cols;
          col -= wrap ? cols : 0;
          row += step_r + wrap;
        };
        while (r < rows) {
          Acc values[kLoadBatch];
          int load_r = r;
          int load_c = c;
#pragma unroll
          for (int i = 0; i < kLoadBatch; ++i) {
            const bool inside = load_r < rows;
            values[i] = to_acc(src[inside ? (h0 + load_r) * stride_h + (w0 + load_c) * stride_w : h0 * stride_h + w0 * stride_w]);
            advance(load_r, load_c);
          }
#pragma unroll
          for (int i = 0; i < kLoadBatch; ++i) {
            if (r < rows) {
              dst[r * tile_cols + c] = values[i];
            }
            advance(r, c);
          }
        }
      }
      __syncthreads();
      for (int t = warp; t < planes_valid * num_bins; t += kPoolWarps) {
        const int p = t / num_bins;
        const BinBox box = boxes[t - p * num_bins];
        const int r_begin = max(box.row_begin, h0) - h0;
        const int r_end = min(box.row_end, h0 + rows) - h0;
        const int c_begin = max(box.col_begin, w0) - w0;
        const int c_end = min(box.col_end, w0 + cols) - w0;
        if (r_begin >= r_end || c_begin >= c_end) {
          continue;  // warp-uniform: the bin misses this tile
        }
        // Lanes cover the bin's columns with the smallest power of two >= its width (at most 32),
        // the remaining lane bits step over rows.
        const int box_cols = c_end - c_begin;
        const int col_bits = box_cols >= kWarpSize ? 5 : 32 - __clz(box_cols - 1);
        const int lanes_per_row = 1 << col_bits;
        const Acc* src = tile + p * plane_stride;
        Acc partial = Acc(0);
        for (int r = r_begin + (lane >> col_bits); r < r_end; r += kWarpSize >> col_bits) {
          for (int c = c_begin + (lane & (lanes_per_row - 1)); c < c_end; c += lanes_per_row) {
            partial += src[r * tile_cols + c];
          }
        }
        partial = warp_sum(partial);
        if (lane == 0) {
          sums[t] += partial;
        }
      }
    }
  }
  __syncthreads();
  // Planes of a group are consecutive channels, so the block's outputs are one contiguous run.
  T* dst = output + (static_cast<int64_t>(b) * channels + c0) * num_bins;
  for (int t = threadIdx.x; t < planes_valid * num_bins; t += blockDim.x) {
    const BinBox box = boxes[t % num_bins];
    const Acc area = static_cast<Acc>((box.row_end - box.row_begin) * (box.col_end - box.col_begin));
    dst[t] = from_acc<T>(sums[t] / area);
  }
}

// Backward. Grid: one block per (batch, channel) plane; lanes run along width (coalesced writes), warps
// over rows. Shared memory holds grad / area for every bin and, per scale, the first and last bin
// index containing each row and each column, so a pixel's gather is a few table reads and adds.
template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
    pyramid_pool_backward_kernel(const T* __restrict__ grad_output, int64_t go_stride_b, int64_t go_stride_c,
                                 int64_t go_stride_s, int channels, int height, int width, PyramidScales scales,
                                 int num_bins, T* __restrict__ grad_input) {
  using Acc = typename AccumulateType<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  Acc* weighted = reinterpret_cast<Acc*>(smem);
  int2* row_bins = reinterpret_cast<int2*>(smem + align16(num_bins * sizeof(Acc)));
  int2* col_bins = row_bins + scales.count * height;
  __shared__ int sizes[kMaxPyramidScales];

  const int b = blockIdx.x / channels;
  const int c = blockIdx.x % channels;
  if (threadIdx.x == 0) {
    copy_sizes(scales, sizes);
  }
  __syncthreads();
  const T* grad = grad_output + b * go_stride_b + c * go_stride_c;
  for (int q = threadIdx.x; q < num_bins; q += blockDim.x) {
    const BinBox box = bin_box(sizes, q, height, width);
    const Acc area = static_cast<Acc>((box.row_end - box.row_begin) * (box.col_end - box.col_begin));
    weighted[q] = to_acc(grad[q * go_stride_s]) / area;
  }
  // Bins of scale s containing index x of an axis of `length`: floor(x*s/length) .. ceil((x+1)*s/length)-1.
  for (int e = threadIdx.x; e < scales.count * (height + width); e += blockDim.x) {
    const bool is_row = e < scales.count * height;
    const int length = is_row ? height : width;
    const int local = is_row ? e : e - scales.count * height;
    const int k = local / length;
    const int x = local % length;
    const int64_t s = sizes[k];
    const int first = static_cast<int>((x * s) / length);
    const int last = static_cast<int>(ceil_div((x + 1) * s, length)) - 1;
    (is_row ? row_bins : col_bins)[local] = make_int2(first, last);
  }
  __syncthreads();

  T* plane = grad_input + static_cast<int64_t>(blockIdx.x) * height * width;
  const int lane = threadIdx.x % kWarpSize;
  for (int h = threadIdx.x / kWarpSize; h < height; h += kPoolWarps) {
    for (int w = lane; w < width; w += kWarpSize) {
      Acc total = Acc(0);
      int offset = 0;
      for (int k = 0; k < scales.count; ++k) {
        const int s = sizes[k];
        const int2 rows = row_bins[k * height + h];
        const int2 cols = col_bins[k * width + w];
        for (int i = rows.x; i <= rows.y; ++i) {
          for (int j = cols.x; j <= cols.y; ++j) {
            total += weighted[offset + i * s + j];
          }
        }
        offset += s * s;
      }
      plane[static_cast<int64_t>(h) * width + w] = from_acc<T>(total);
    }
  }
}

int pyramid_bins(const PyramidScales& scales) {
  int total = 0;
  for (int k = 0; k < scales.count; ++k) {
    total += scales.sizes[k] * scales.sizes[k];
  }
  return total;
}

bool valid_scales(const PyramidScales& scales) {
  if (scales.count < 1 || scales.count > kMaxPyramidScales) {
    return false;
  }
  for (int k = 0; k < scales.count; ++k) {
    if (scales.sizes[k] < 1 || scales.sizes[k] * static_cast<int64_t>(scales.sizes[k]) > kMaxPyramidBins) {
      return false;
    }
  }
  return pyramid_bins(scales) <= kMaxPyramidBins;
}

template <typename T>
cudaError_t launch_forward(const void* input, int64_t batch, int64_t channels, int64_t height, int64_t width,
                           const int64_t strides[4], const PyramidScales& scales, void* output,
                           cudaStream_t stream) {
  using Acc = typename AccumulateType<T>::type;
  const int num_bins = pyramid_bins(scales);
  // channels_last: give each block enough consecutive channels that one pixel is a full 32-byte sector.
  int planes = 1;
  if (strides[3] != 1 && strides[1] == 1 && channels > 1) {
    planes = static_cast<int>(32 / sizeof(T));
    while (planes > 1 && planes * num_bins > kMaxPyramidBins) {
      planes /= 2;
    }
  }
  const int64_t tile_elems = kTileBytes / sizeof(Acc);
  const int tile_cols = static_cast<int>(std::min<int64_t>(width, std::max<int64_t>(1, tile_elems / planes)));
  const int tile_rows =
      static_cast<int>(std::min<int64_t>(height, std::max<int64_t>(1, tile_elems / (planes * tile_cols))));
  const size_t smem = align16(num_bins * sizeof(BinBox)) + align16(static_cast<size_t>(planes) * num_bins * sizeof(Acc)) +
                      static_cast<size_t>(planes) * (static_cast<size_t>(tile_rows) * tile_cols + 1) * sizeof(Acc);
  const int64_t blocks = batch * ceil_div(channels, planes);
  cudaError_t status = allow_dynamic_smem(pyramid_pool_forward_kernel<T>, smem);
  if (status != cudaSuccess) {
    return status;
  }
  return launch_kernel<pyramid_pool_forward_kernel<T>>(
      static_cast<unsigned>(blocks), kPoolThreads, smem, stream, static_cast<const T*>(input),
      static_cast<int>(channels), static_cast<int>(height), static_cast<int>(width), strides[0], strides[1],
      strides[2], strides[3], scales, num_bins, planes, tile_rows, tile_cols, static_cast<T*>(output));
}

template <typename T>
cudaError_t launch_backward(ConstView3 grad_output, int64_t batch, int64_t channels, const PyramidScales& scales,
                            int64_t height, int64_t width, void* grad_input, cudaStream_t stream) {
  using Acc = typename AccumulateType<T>::type;
  const int num_bins = pyramid_bins(scales);
  const size_t smem = align16(num_bins * sizeof(Acc)) + static_cast<size_t>(scales.count) * (height + width) * sizeof(int2);
  cudaError_t status = allow_dynamic_smem(pyramid_pool_backward_kernel<T>, smem);
  if (status != cudaSuccess) {
    return status;
  }
  return launch_kernel<pyramid_pool_backward_kernel<T>>(
      static_cast<unsigned>(batch * channels), kPoolThreads, smem, stream, static_cast<const T*>(grad_output.data),
      grad_output.batch_stride, grad_output.row_stride, grad_output.col_stride, static_cast<int>(channels),
      static_cast<int>(height), static_cast<int>(width), scales, num_bins, static_cast<T*>(grad_input));
}

bool valid_extents(int64_t batch, int64_t channels, int64_t height, int64_t width) {
  constexpr int64_t kIntMax = 0x7fffffff;
  return batch > 0 && channels > 0 && height > 0 && width > 0 && channels <= kIntMax && height <= kIntMax &&
         width <= kIntMax && batch * channels <= kIntMax;
}

}  // namespace

cudaError_t pyramid_pool_forward(DType dtype, const void* input, int64_t batch, int64_t channels, int64_t height,
                                 int64_t width, const int64_t input_strides[4], const PyramidScales& scales,
                                 void* output, cudaStream_t stream) {
  if (!valid_scales(scales) || !valid_extents(batch, channels, height, width)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype<true>(dtype, [&](auto tag) {
    return launch_forward<typename decltype(tag)::type>(input, batch, channels, height, width, input_strides, scales,
                                                        output, stream);
  });
}

cudaError_t pyramid_pool_backward(DType dtype, ConstView3 grad_output, int64_t batch, int64_t channels,
                                  const PyramidScales& scales, int64_t height, int64_t width, void* grad_input,
                                  cudaStream_t stream) {
  if (!valid_scales(scales) || !valid_extents(batch, channels, height, width)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype<true>(dtype, [&](auto tag) {
    return launch_backward<typename decltype(tag)::type>(grad_output, batch, channels, scales, height, width,
                                                         grad_input, stream);
  });
}

}  // namespace cuda_kernels
}  // namespace annkernels
