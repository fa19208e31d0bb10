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

// One map of a forward launch, with the tiling launch_forward chose for its layout.
template <typename T>
struct MapTiles {
  const T* input;
  T* output;  // [batch, channels, S] contiguous
  int64_t stride_b, stride_c, stride_h, stride_w;
  int channels;
  int planes, tile_rows, tile_cols;
  int row_stride;      // of a plane in the staged tile: tile_cols, or more (see plan_map)
  int row_sums_ld;     // > 0: the row pass (sum_bins_by_rows), with this leading dimension of its row sums
  int first_block;     // the map's blocks start here in the grid
};

// Up to kMaxPoolMaps maps pooled by one launch; a one-map launch sets second.first_block to the grid size.
template <typename T>
struct ForwardMaps {
  MapTiles<T> first, second;
};

// Scales the row pass takes at most (their running sums live in registers).
constexpr int kRowPassScales = 4;

// Sums of every (plane, bin) over one staged tile, one warp per (plane, bin): lanes cover the bin's columns
// with the smallest power of two >= its width (at most 32), the remaining lane bits step over rows; the warp
// adds its total to sums[t]. Each pixel is read once per bin that holds it (about 4.4 times for (1, 3, 6, 8)).
template <typename Acc>
__device__ void sum_bins_by_warps(const Acc* tile, int plane_stride, int row_stride, const BinBox* boxes, Acc* sums,
                                  int planes_valid, int num_bins, int h0, int w0, int rows, int cols) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
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
    const int box_cols = c_end - c_begin;
    const int col_bits = box_cols >= kWarpSize ? 5 : 32 - __clz(box_cols - 1);
    const int lanes_per_row = 1 << col_bits;
    const Acc* src = tile + p * plane_stride;
    Acc partial = Acc(0);
    for (int r = r_begin + (lane >> col_bits); r < r_end; r += kWarpSize >> col_bits) {
      for (int c = c_begin + (lane & (lanes_per_row - 1)); c < c_end; c += lanes_per_row) {
        partial += src[r * row_stride + c];
      }
    }
    partial = warp_sum(partial);
    if (lane == 0) {
      sums[t] += partial;
    }
  }
}

// The row pass, for one plane staged in full-width rows (plan_map picks it): each pixel is read once. Thread r
// walks tile row r left to right keeping, per scale, the running sums of the column bin that holds the pixel
// and of the next one (neighbouring bins share at most one pixel when the scale is at most the width); each
// finished column bin goes to row_sums[r][column bin]. Then thread q adds bin q's column-bin entries over the
// tile rows of its row bin, in row order, to sums[q]. Rows are an odd number of words apart, so the lanes of a
// warp (consecutive rows) read and write distinct banks.
template <typename Acc>
__device__ void sum_bins_by_rows(const Acc* tile, int row_stride, Acc* row_sums, int row_sums_ld,
                                 const int* column_bins, const BinBox* boxes, Acc* sums, const int* sizes,
                                 int scale_count, int num_bins, int h0, int rows, int width) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const Acc* row = tile + r * row_stride;
    Acc* out = row_sums + r * row_sums_ld;
    int bin[kRowPassScales], end[kRowPassScales], next_start[kRowPassScales], first_column_bin[kRowPassScales];
    Acc current[kRowPassScales], next[kRowPassScales];
    int offset = 0;
#pragma unroll
    for (int k = 0; k < kRowPassScales; ++k) {
      const int s = k < scale_count ? sizes[k] : 1;
      bin[k] = 0;
      end[k] = k < scale_count ? adaptive_bin_end(0, width, s) : width + 1;  // an unused scale never ends a bin
      next_start[k] = s > 1 ? adaptive_bin_start(1, width, s) : width;
      first_column_bin[k] = offset;
      offset += k < scale_count ? s : 0;
      current[k] = next[k] = Acc(0);
    }
    for (int c = 0; c < width; ++c) {
      const Acc value = row[c];
#pragma unroll
      for (int k = 0; k < kRowPassScales; ++k) {
        if (c == end[k]) {  // bin[k] is complete; pixel c starts (or continues) the next
          const int s = sizes[k];
          out[first_column_bin[k] + bin[k]] = current[k];
          ++bin[k];
          current[k] = next[k];
          next[k] = Acc(0);
          end[k] = adaptive_bin_end(bin[k], width, s);
          next_start[k] = bin[k] + 1 < s ? adaptive_bin_start(bin[k] + 1, width, s) : width;
        }
        current[k] += value;
        if (c >= next_start[k]) {
          next[k] += value;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kRowPassScales; ++k) {
      if (k < scale_count) {
        out[first_column_bin[k] + bin[k]] = current[k];  // the last bin of the row
      }
    }
  }
  __syncthreads();
  for (int q = threadIdx.x; q < num_bins; q += blockDim.x) {
    const BinBox box = boxes[q];
    const int r_end = min(box.row_end, h0 + rows) - h0;
    Acc partial = Acc(0);
    for (int r = max(box.row_begin, h0) - h0; r < r_end; ++r) {
      partial += row_sums[r * row_sums_ld + column_bins[q]];
    }
    sums[q] += partial;
  }
}

// Forward. Grid: one block per (map, batch, group of `planes` consecutive channels). The block walks the
// planes in tiles of tile_rows x tile_cols pixels: each tile is loaded once into shared memory (threads
// run along whichever of channel / width is contiguous, so loads are coalesced for NCHW and for
// channels_last), then its bins are summed and added to each bin's running sum: by the row pass for one plane
// in full-width rows (NCHW, the blocks' case), else by one warp per (plane, bin). The thread or warp owning
// each sum and the tile order are fixed, so the result is deterministic. Sums in Acc (fp32, or fp64 for fp64
// input); output [B, C, S] contiguous.
//
// The launch bounds ask for 2 blocks per SM, a budget of 128 registers: left to itself ptxas keeps the kernel
// near 40 registers (6 blocks per SM) and gets there by interleaving a batch's loads with its shared stores
// (2-4 in flight); with the budget it issues all kLoadBatch loads first (about 90 registers used).
template <typename T>
__global__ void __launch_bounds__(kPoolThreads, 2)
    pyramid_pool_forward_kernel(ForwardMaps<T> maps, int height, int width, PyramidScales scales, int num_bins) {
  using Acc = typename AccumulateType<T>::type;
  const MapTiles<T> map = blockIdx.x >= maps.second.first_block ? maps.second : maps.first;
  const int planes = map.planes, tile_rows = map.tile_rows, tile_cols = map.tile_cols, channels = map.channels;
  const int row_stride = map.row_stride;
  extern __shared__ __align__(16) unsigned char smem[];
  BinBox* boxes = reinterpret_cast<BinBox*>(smem);
  Acc* sums = reinterpret_cast<Acc*>(smem + align16(num_bins * sizeof(BinBox)));
  Acc* tile = reinterpret_cast<Acc*>(smem + align16(num_bins * sizeof(BinBox)) +
                                     align16(static_cast<size_t>(planes) * num_bins * sizeof(Acc)));
  // Odd plane stride: channels_last loads (consecutive threads -> consecutive planes) hit distinct banks.
  const int plane_stride = tile_rows * row_stride + 1;
  // The row pass's buffers follow the tile (forward_smem sizes them only for it).
  int* column_bins = reinterpret_cast<int*>(reinterpret_cast<unsigned char*>(tile) +
                                            align16(static_cast<size_t>(planes) * plane_stride * sizeof(Acc)));
  Acc* row_sums =
      reinterpret_cast<Acc*>(reinterpret_cast<unsigned char*>(column_bins) + align16(num_bins * sizeof(int)));

  const int groups_per_batch = static_cast<int>(ceil_div(channels, planes));
  const int block = static_cast<int>(blockIdx.x) - map.first_block;
  const int b = block / groups_per_batch;
  const int c0 = (block % groups_per_batch) * planes;
  const int planes_valid = min(planes, channels - c0);

  __shared__ int sizes[kMaxPyramidScales];
  if (threadIdx.x == 0) {
    copy_sizes(scales, sizes);
  }
  __syncthreads();
  for (int q = threadIdx.x; q < num_bins; q += blockDim.x) {
    boxes[q] = bin_box(sizes, q, height, width);
    if (map.row_sums_ld > 0) {  // bin q's column bin: its scale's first column bin, plus its column
      int offset = 0, column_offset = 0, k = 0;
      while (q >= offset + sizes[k] * sizes[k]) {
        offset += sizes[k] * sizes[k];
        column_offset += sizes[k];
        ++k;
      }
      column_bins[q] = column_offset + (q - offset) % sizes[k];
    }
  }
  for (int t = threadIdx.x; t < planes * num_bins; t += blockDim.x) {
    sums[t] = Acc(0);
  }

  const T* __restrict__ batch_input = map.input + b * map.stride_b + c0 * map.stride_c;
  const int plane = threadIdx.x % planes;
  const int pos_first = threadIdx.x / planes;
  const int pos_step = blockDim.x / planes;

  for (int h0 = 0; h0 < height; h0 += tile_rows) {
    const int rows = min(tile_rows, height - h0);
    for (int w0 = 0; w0 < width; w0 += tile_cols) {
      const int cols = min(tile_cols, width - w0);
      __syncthreads();  // the previous tile has been summed (first time: boxes and sums are ready)
      if (plane < planes_valid) {
        const T* src = batch_input + plane * map.stride_c;
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
            values[i] = to_acc(src[inside ? (h0 + load_r) * map.stride_h + (w0 + load_c) * map.stride_w
                                          : h0 * map.stride_h + w0 * map.stride_w]);
            advance(load_r, load_c);
          }
#pragma unroll
          for (int i = 0; i < kLoadBatch; ++i) {
            if (r < rows) {
              dst[r * row_stride + c] = values[i];
            }
            advance(r, c);
          }
        }
      }
      __syncthreads();
      if (map.row_sums_ld > 0) {
        sum_bins_by_rows(tile, row_stride, row_sums, map.row_sums_ld, column_bins, boxes, sums, sizes, scales.count,
                         num_bins, h0, rows, width);
      } else {
        sum_bins_by_warps(tile, plane_stride, row_stride, boxes, sums, planes_valid, num_bins, h0, w0, rows, cols);
      }
    }
  }
  __syncthreads();
  // Planes of a group are consecutive channels, so the block's outputs are one contiguous run.
  T* __restrict__ dst = map.output + (static_cast<int64_t>(b) * channels + c0) * num_bins;
  for (int t = threadIdx.x; t < planes_valid * num_bins; t += blockDim.x) {
    const BinBox box = boxes[t % num_bins];
    const Acc area = static_cast<Acc>((box.row_end - box.row_begin) * (box.col_end - box.col_begin));
    dst[t] = from_acc<T>(sums[t] / area);
  }
}

// One map of a backward launch.
template <typename T>
struct MapPlanes {
  const T* grad_output;  // [batch, channels, S], any strides
  int64_t stride_b, stride_c, stride_s;
  T* grad_input;  // [batch, channels, height, width] contiguous
  int channels;
  int first_block;
};

template <typename T>
struct BackwardMaps {
  MapPlanes<T> first, second;  // as ForwardMaps
};

// Backward. Grid: one block per (map, batch, channel) plane. A thread computes kGroupPixels consecutive pixels
// of a row (one vector store where the row allows), lanes run along width (coalesced), warps over rows. Shared
// memory holds grad / area for every bin and two tables: per scale and row, the first and last row bins that
// hold the row; per scale and column group, the first and last column bins of each of its pixels. The
// pixels of a group mostly share their bins, so a thread reads each bin value once for all of them (a warp's
// reads of one row are broadcasts) and adds it to the pixels that lie in it: about 4x fewer shared-memory
// requests than a gather per pixel. Each pixel adds its bins in the same order (scale, row bin, column bin),
// so the result is deterministic.
constexpr int kGroupPixels = 4;
constexpr int kHeldScales = 4;  // scales whose column bins a thread keeps in registers
constexpr int kBinBits = 8;  // a bin index along one axis is below 64 (valid_scales: s * s <= kMaxPyramidBins)
static_assert(kMaxPyramidBins <= 64 * 64, "bin indices must fit in kBinBits");

// The bins of scale s that hold index x of an axis of `length`: floor(x*s/length) .. ceil((x+1)*s/length)-1.
__device__ __forceinline__ int2 axis_bins(int64_t x, int64_t s, int64_t length) {
  return make_int2(static_cast<int>((x * s) / length), static_cast<int>(ceil_div((x + 1) * s, length)) - 1);
}

template <typename T>
__device__ __forceinline__ void store_group(T* __restrict__ dst,
                                            const typename AccumulateType<T>::type (&total)[kGroupPixels], int valid,
                                            bool vector) {
  struct alignas(kGroupPixels * sizeof(T)) Group {
    T pixel[kGroupPixels];
  };
  if (vector) {
    Group group;
#pragma unroll
    for (int p = 0; p < kGroupPixels; ++p) {
      group.pixel[p] = from_acc<T>(total[p]);
    }
    *reinterpret_cast<Group*>(dst) = group;
  } else {
#pragma unroll
    for (int p = 0; p < kGroupPixels; ++p) {
      if (p < valid) {
        dst[p] = from_acc<T>(total[p]);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
    pyramid_pool_backward_kernel(BackwardMaps<T> maps, int height, int width, PyramidScales scales, int num_bins) {
  using Acc = typename AccumulateType<T>::type;
  const MapPlanes<T> map = blockIdx.x >= maps.second.first_block ? maps.second : maps.first;
  const int block = static_cast<int>(blockIdx.x) - map.first_block;
  const int groups = static_cast<int>(ceil_div(width, kGroupPixels));
  extern __shared__ __align__(16) unsigned char smem[];
  Acc* weighted = reinterpret_cast<Acc*>(smem);
  // row_bins[k * height + h]: first | last << 16; column_bins[k * groups + g]: pixel p's first (x) and last (y)
  // column bins in byte p (a pixel past the width gets first > last: no bin).
  uint32_t* row_bins = reinterpret_cast<uint32_t*>(smem + align16(num_bins * sizeof(Acc)));
  uint2* column_bins = reinterpret_cast<uint2*>(smem + align16(num_bins * sizeof(Acc)) +
                                                align16(scales.count * static_cast<size_t>(height) * sizeof(uint32_t)));
  __shared__ int sizes[kMaxPyramidScales];

  const int b = block / map.channels;
  const int c = block % map.channels;
  if (threadIdx.x == 0) {
    copy_sizes(scales, sizes);
  }
  __syncthreads();
  const T* __restrict__ grad = map.grad_output + b * map.stride_b + c * map.stride_c;
  for (int q = threadIdx.x; q < num_bins; q += blockDim.x) {
    const BinBox box = bin_box(sizes, q, height, width);
    const Acc area = static_cast<Acc>((box.row_end - box.row_begin) * (box.col_end - box.col_begin));
    weighted[q] = to_acc(grad[q * map.stride_s]) / area;
  }
  for (int e = threadIdx.x; e < scales.count * height; e += blockDim.x) {
    const int2 bins = axis_bins(e % height, sizes[e / height], height);
    row_bins[e] = static_cast<uint32_t>(bins.x) | static_cast<uint32_t>(bins.y) << 16;
  }
  for (int e = threadIdx.x; e < scales.count * groups; e += blockDim.x) {
    const int s = sizes[e / groups];
    const int first_pixel = e % groups * kGroupPixels;
    uint2 packed = make_uint2(0, 0);
#pragma unroll
    for (int p = 0; p < kGroupPixels; ++p) {
      const int2 bins = first_pixel + p < width ? axis_bins(first_pixel + p, s, width) : make_int2(1, 0);
      packed.x |= static_cast<uint32_t>(bins.x) << (kBinBits * p);
      packed.y |= static_cast<uint32_t>(bins.y) << (kBinBits * p);
    }
    column_bins[e] = packed;
  }
  __syncthreads();

  constexpr uint32_t kBinMask = (1u << kBinBits) - 1;
  T* __restrict__ plane = map.grad_input + static_cast<int64_t>(block) * height * width;
  // One store per group when every group starts on a whole vector (the plane is contiguous).
  const bool vector = width % kGroupPixels == 0 &&
                      reinterpret_cast<uintptr_t>(plane) % (kGroupPixels * sizeof(T)) == 0;
  const int lane = threadIdx.x % kWarpSize;
  for (int g = lane; g < groups; g += kWarpSize) {
    // The group's column bins of the first kHeldScales scales stay in registers over all its rows.
    uint2 held[kHeldScales];
#pragma unroll
    for (int k = 0; k < kHeldScales; ++k) {
      held[k] = k < scales.count ? column_bins[k * groups + g] : make_uint2(0, 0);
    }
    for (int h = threadIdx.x / kWarpSize; h < height; h += kPoolWarps) {
      Acc total[kGroupPixels];
#pragma unroll
      for (int p = 0; p < kGroupPixels; ++p) {
        total[p] = Acc(0);
      }
      int offset = 0;
      const auto add_scale = [&](int k, const uint2& columns) {
        const int s = sizes[k];
        const uint32_t rows = row_bins[k * height + h];
        // Pixel 0 has the group's first column bin and its last valid pixel the last; past-the-width pixels
        // hold first 1 > last 0, so the last bin is the largest last over the pixels.
        int last_column = 0;
#pragma unroll
        for (int p = 0; p < kGroupPixels; ++p) {
          last_column = max(last_column, static_cast<int>(columns.y >> (kBinBits * p) & kBinMask));
        }
        for (int i = rows & 0xffff; i <= static_cast<int>(rows >> 16); ++i) {
          for (int j = columns.x & kBinMask; j <= last_column; ++j) {
            const Acc value = weighted[offset + i * s + j];
#pragma unroll
            for (int p = 0; p < kGroupPixels; ++p) {
              if (j >= static_cast<int>(columns.x >> (kBinBits * p) & kBinMask) &&
                  j <= static_cast<int>(columns.y >> (kBinBits * p) & kBinMask)) {
                total[p] += value;
              }
            }
          }
        }
        offset += s * s;
      };
#pragma unroll
      for (int k = 0; k < kHeldScales; ++k) {
        if (k < scales.count) {
          add_scale(k, held[k]);
        }
      }
      for (int k = kHeldScales; k < scales.count; ++k) {
        add_scale(k, column_bins[k * groups + g]);
      }
      const int w = g * kGroupPixels;
      store_group<T>(plane + static_cast<int64_t>(h) * width + w, total, width - w, vector);
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

// channels_last: give each block enough consecutive channels that one pixel is a full 32-byte sector.
template <typename T>
MapTiles<T> plan_map(const PoolMap& map, const PyramidScales& scales, int num_bins, int64_t height, int64_t width,
                     int first_block) {
  using Acc = typename AccumulateType<T>::type;
  int planes = 1;
  if (map.strides[3] != 1 && map.strides[1] == 1 && map.channels > 1) {
    planes = static_cast<int>(32 / sizeof(T));
    while (planes > 1 && planes * num_bins > kMaxPyramidBins) {
      planes /= 2;
    }
  }
  const int64_t tile_elems = kTileBytes / sizeof(Acc);
  const int tile_cols = static_cast<int>(std::min<int64_t>(width, std::max<int64_t>(1, tile_elems / planes)));
  const int tile_rows =
      static_cast<int>(std::min<int64_t>(height, std::max<int64_t>(1, tile_elems / (planes * tile_cols))));
  // One plane per block in full-width rows, at most kRowPassScales scales, each at most the width, and fewer
  // column bins than pixels in a row (so the row sums stay smaller than the tile): the row pass, with rows an
  // odd number of words apart. Otherwise the bin warps: a warp sums a bin narrower than 32 pixels over
  // 32 / L rows at once (L lanes per row, the bin width rounded up to a power of two). Rows L words apart
  // modulo 32 put those rows in distinct banks, so the row stride is padded to that for the narrowest bins
  // (the largest scale, which has the most bins).
  int largest_scale = 1, column_bins = 0;
  for (int k = 0; k < scales.count; ++k) {
    largest_scale = std::max(largest_scale, scales.sizes[k]);
    column_bins += scales.sizes[k];
  }
  int row_stride = tile_cols;
  int row_sums_ld = 0;
  if (planes == 1 && tile_cols == width && scales.count <= kRowPassScales && largest_scale <= width &&
      column_bins < width) {
    row_stride = tile_cols | 1;
    row_sums_ld = column_bins | 1;
  } else if (planes == 1) {
    int lanes_per_row = 1;
    while (lanes_per_row < 32 && lanes_per_row < width / largest_scale) {
      lanes_per_row *= 2;
    }
    if (lanes_per_row < 32 && tile_rows > 1) {
      row_stride = static_cast<int>(round_up(std::max(tile_cols - lanes_per_row, 0), 32)) + lanes_per_row;
    }
  }
  return MapTiles<T>{static_cast<const T*>(map.input), static_cast<T*>(map.output), map.strides[0], map.strides[1],
                     map.strides[2], map.strides[3], static_cast<int>(map.channels), planes, tile_rows, tile_cols,
                     row_stride, row_sums_ld, first_block};
}

template <typename T>
size_t forward_smem(const MapTiles<T>& tiles, int num_bins) {
  using Acc = typename AccumulateType<T>::type;
  const size_t tile = static_cast<size_t>(tiles.planes) *
                      (static_cast<size_t>(tiles.tile_rows) * tiles.row_stride + 1) * sizeof(Acc);
  const size_t row_sums = static_cast<size_t>(tiles.tile_rows) * tiles.row_sums_ld * sizeof(Acc);
  const size_t row_pass = tiles.row_sums_ld > 0 ? align16(num_bins * sizeof(int)) + row_sums : 0;
  return align16(num_bins * sizeof(BinBox)) + align16(static_cast<size_t>(tiles.planes) * num_bins * sizeof(Acc)) +
         align16(tile) + row_pass;
}

template <typename T>
cudaError_t launch_forward(const PoolMap* maps, int map_count, int64_t batch, int64_t height, int64_t width,
                           const PyramidScales& scales, cudaStream_t stream) {
  const int num_bins = pyramid_bins(scales);
  ForwardMaps<T> launch{};
  MapTiles<T>* tiles[kMaxPoolMaps] = {&launch.first, &launch.second};
  int64_t blocks = 0;
  size_t smem = 0;
  for (int m = 0; m < map_count; ++m) {
    *tiles[m] = plan_map<T>(maps[m], scales, num_bins, height, width, static_cast<int>(blocks));
    blocks += batch * ceil_div(maps[m].channels, tiles[m]->planes);
    smem = std::max(smem, forward_smem(*tiles[m], num_bins));
  }
  if (map_count == 1) {
    launch.second.first_block = static_cast<int>(blocks);  // no block reaches it
  }
  cudaError_t status = allow_dynamic_smem(pyramid_pool_forward_kernel<T>, smem);
  if (status != cudaSuccess) {
    return status;
  }
  return launch_kernel<pyramid_pool_forward_kernel<T>>(static_cast<unsigned>(blocks), kPoolThreads, smem, stream,
                                                       launch, static_cast<int>(height), static_cast<int>(width),
                                                       scales, num_bins);
}

template <typename T>
cudaError_t launch_backward(const PoolMapGrad* maps, int map_count, int64_t batch, const PyramidScales& scales,
                            int64_t height, int64_t width, cudaStream_t stream) {
  using Acc = typename AccumulateType<T>::type;
  const int num_bins = pyramid_bins(scales);
  BackwardMaps<T> launch{};
  MapPlanes<T>* planes[kMaxPoolMaps] = {&launch.first, &launch.second};
  int64_t blocks = 0;
  for (int m = 0; m < map_count; ++m) {
    const ConstView3& grad = maps[m].grad_output;
    *planes[m] = MapPlanes<T>{static_cast<const T*>(grad.data), grad.batch_stride, grad.row_stride, grad.col_stride,
                              static_cast<T*>(maps[m].grad_input), static_cast<int>(maps[m].channels),
                              static_cast<int>(blocks)};
    blocks += batch * maps[m].channels;
  }
  if (map_count == 1) {
    launch.second.first_block = static_cast<int>(blocks);  // no block reaches it
  }
  const size_t smem = align16(num_bins * sizeof(Acc)) + align16(scales.count * height * sizeof(uint32_t)) +
                      scales.count * ceil_div(width, kGroupPixels) * sizeof(uint2);
  cudaError_t status = allow_dynamic_smem(pyramid_pool_backward_kernel<T>, smem);
  if (status != cudaSuccess) {
    return status;
  }
  return launch_kernel<pyramid_pool_backward_kernel<T>>(static_cast<unsigned>(blocks), kPoolThreads, smem, stream,
                                                        launch, static_cast<int>(height), static_cast<int>(width),
                                                        scales, num_bins);
}

bool valid_extents(int64_t batch, int64_t channels, int64_t height, int64_t width) {
  constexpr int64_t kIntMax = 0x7fffffff;
  return batch > 0 && channels > 0 && height > 0 && width > 0 && channels <= kIntMax && height <= kIntMax &&
         width <= kIntMax && batch * channels <= kIntMax;
}

// 1 to kMaxPoolMaps maps with valid extents, and every map's blocks numbered by an int.
template <typename Map>
bool valid_maps(const Map* maps, int map_count, int64_t batch, int64_t height, int64_t width) {
  if (map_count < 1 || map_count > kMaxPoolMaps) {
    return false;
  }
  int64_t all_channels = 0;
  for (int m = 0; m < map_count; ++m) {
    if (!valid_extents(batch, maps[m].channels, height, width)) {
      return false;
    }
    all_channels += maps[m].channels;
  }
  return valid_extents(batch, all_channels, height, width);
}

}  // namespace

cudaError_t pyramid_pool_forward(DType dtype, const PoolMap* maps, int map_count, int64_t batch, int64_t height,
                                 int64_t width, const PyramidScales& scales, cudaStream_t stream) {
  if (!valid_scales(scales) || !valid_maps(maps, map_count, batch, height, width)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype<true>(dtype, [&](auto tag) {
    return launch_forward<typename decltype(tag)::type>(maps, map_count, batch, height, width, scales, stream);
  });
}

cudaError_t pyramid_pool_backward(DType dtype, const PoolMapGrad* maps, int map_count, int64_t batch,
                                  const PyramidScales& scales, int64_t height, int64_t width, cudaStream_t stream) {
  if (!valid_scales(scales) || !valid_maps(maps, map_count, batch, height, width)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype<true>(dtype, [&](auto tag) {
    return launch_backward<typename decltype(tag)::type>(maps, map_count, batch, scales, height, width, stream);
  });
}
}  // namespace cuda_kernels
}  // namespace annkernels
