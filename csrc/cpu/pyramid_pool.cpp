// CPU pyramid pooling: the adaptive-average bins of every scale in one pass over the input.
//
// The bin edges of all scales, taken together, cut each axis into elementary segments
// (H=64 with scales 1,3,6,8 gives 16 row segments). Every bin of every scale is a rectangle of
// whole segment cells, and every pixel of one cell lies in the same bins. So the forward reduces
// each plane to its cell sums once and builds all bins from those; the backward computes one
// gradient value per cell and fills the cell's pixels with it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "annkernels/checks.h"

namespace annkernels {
namespace {

// The cells of one axis of length `length`, and for every bin of every scale the segments it spans.
struct AxisSegments {
  std::vector<int64_t> edges;  // segment j covers [edges[j], edges[j + 1])
  // Bins of scale k occupy entries [bin_offset[k], bin_offset[k] + scale_k) of the vectors below.
  std::vector<int64_t> bin_offset;
  std::vector<int64_t> bin_first_segment;  // bin covers segments [first, end)
  std::vector<int64_t> bin_end_segment;
  std::vector<int64_t> bin_length;  // in pixels

  int64_t num_segments() const { return static_cast<int64_t>(edges.size()) - 1; }
};

// PyTorch's adaptive pooling bin o of `scale` bins over `length`: [floor(o*L/s), ceil((o+1)*L/s)).
int64_t bin_start(int64_t o, int64_t length, int64_t scale) { return (o * length) / scale; }
int64_t bin_end(int64_t o, int64_t length, int64_t scale) { return ((o + 1) * length + scale - 1) / scale; }

AxisSegments make_axis_segments(int64_t length, c10::IntArrayRef scales) {
  AxisSegments axis;
  for (int64_t scale : scales) {
    for (int64_t o = 0; o < scale; ++o) {
      axis.edges.push_back(bin_start(o, length, scale));
      axis.edges.push_back(bin_end(o, length, scale));
    }
  }
  std::sort(axis.edges.begin(), axis.edges.end());
  axis.edges.erase(std::unique(axis.edges.begin(), axis.edges.end()), axis.edges.end());
  auto segment_of = [&](int64_t edge) {
    return static_cast<int64_t>(std::lower_bound(axis.edges.begin(), axis.edges.end(), edge) - axis.edges.begin());
  };
  int64_t offset = 0;
  for (int64_t scale : scales) {
    axis.bin_offset.push_back(offset);
    for (int64_t o = 0; o < scale; ++o) {
      const int64_t start = bin_start(o, length, scale);
      const int64_t end = bin_end(o, length, scale);
      axis.bin_first_segment.push_back(segment_of(start));
      axis.bin_end_segment.push_back(segment_of(end));
      axis.bin_length.push_back(end - start);
    }
    offset += scale;
  }
  return axis;
}

// dst[i] += src[i * stride], with a unit-stride branch the compiler vectorises.
template <typename acc_t, typename scalar_t>
inline void accumulate_strided(acc_t* dst, const scalar_t* src, int64_t count, int64_t stride) {
  if (stride == 1) {
    for (int64_t i = 0; i < count; ++i) dst[i] += static_cast<acc_t>(src[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] += static_cast<acc_t>(src[i * stride]);
  }
}

// Forward, in two parallel phases that meet in `cells` [B, C, row segments x column segments] (acc_t).
// Phase 1 reads the input once, in the order its layout makes sequential:
//  - plane layouts (W stride <= C stride, e.g. contiguous): parallel over planes (batch, channel). For
//    each row segment the rows are added into `column_sums` [W] (vectorised along W), which is then
//    reduced over each column segment. cells is stored [B, C, cells].
//  - channel-inner layouts (C stride < W stride, e.g. channels_last): parallel over (batch, row
//    segment). Each row is summed per column segment, all C channels at once (vectorised along C),
//    and the row sums are added into the cells. cells is stored [B, cells, C].
// Phase 2, parallel over (batch, group of channels): a 2-D prefix sum of the cells in fp64 (so that
// differences of prefix sums lose nothing), then every bin is four prefix lookups / area.
// Accumulation over pixels: acc_t (fp32; fp64 for fp64). Output [B, C, S] contiguous, input dtype.
template <typename scalar_t>
void pyramid_pool_forward_kernel(const at::Tensor& input, c10::IntArrayRef scales, const AxisSegments& rows,
                                 const AxisSegments& cols, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = input.size(0), channels = input.size(1), width = input.size(3);
  const int64_t stride_b = input.stride(0), stride_c = input.stride(1), stride_h = input.stride(2),
                stride_w = input.stride(3);
  const int64_t num_rows = rows.num_segments(), num_cols = cols.num_segments();
  const int64_t num_cells = num_rows * num_cols;
  const scalar_t* input_data = input.const_data_ptr<scalar_t>();
  at::Tensor cells =
      at::empty({batch, channels, num_cells}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* cell_data = cells.mutable_data_ptr<acc_t>();
  const bool channel_inner = stride_c < stride_w && channels > 1;
  const int64_t cell_stride_c = channel_inner ? 1 : num_cells;
  const int64_t cell_stride_cell = channel_inner ? channels : 1;

  if (channel_inner) {
    at::parallel_for(0, batch * num_rows, 1, [&](int64_t begin, int64_t end) {
      // Row sums first, then rows into cells: two short summations instead of one over the whole cell,
      // which keeps the fp32 error near PyTorch's for large cells (scale 1 is a single cell).
      std::vector<acc_t> row_sums(num_cols * channels);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / num_rows, i = task % num_rows;
        acc_t* cell_row = cell_data + b * channels * num_cells + i * num_cols * channels;
        std::fill(cell_row, cell_row + num_cols * channels, acc_t(0));
        for (int64_t h = rows.edges[i]; h < rows.edges[i + 1]; ++h) {
          const scalar_t* row = input_data + b * stride_b + h * stride_h;
          for (int64_t j = 0; j < num_cols; ++j) {
            acc_t* sums = row_sums.data() + j * channels;
            std::fill(sums, sums + channels, acc_t(0));
            for (int64_t w = cols.edges[j]; w < cols.edges[j + 1]; ++w) {
              accumulate_strided(sums, row + w * stride_w, channels, stride_c);
            }
          }
          accumulate_strided(cell_row, row_sums.data(), num_cols * channels, 1);
        }
      }
    });
  } else {
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> column_sums(width);
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* base = input_data + (plane / channels) * stride_b + (plane % channels) * stride_c;
        acc_t* plane_cells = cell_data + plane * num_cells;
        for (int64_t i = 0; i < num_rows; ++i) {
          std::fill(column_sums.begin(), column_sums.end(), acc_t(0));
          for (int64_t h = rows.edges[i]; h < rows.edges[i + 1]; ++h) {
            accumulate_strided(column_sums.data(), base + h * stride_h, width, stride_w);
          }
          for (int64_t j = 0; j < num_cols; ++j) {
            acc_t sum = 0;
            for (int64_t w = cols.edges[j]; w < cols.edges[j + 1]; ++w) sum += column_sums[w];
            plane_cells[i * num_cols + j] = sum;
          }
        }
      }
    });
  }

  constexpr int64_t kGroup = 16;
  const int64_t groups_per_batch = (channels + kGroup - 1) / kGroup;
  const int64_t pyramid = output.size(2);
  scalar_t* output_data = output.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, batch * groups_per_batch, 1, [&](int64_t begin, int64_t end) {
    // prefix[i][j][c] = sum of the cells above row segment i and left of column segment j.
    const int64_t prefix_row = (num_cols + 1) * kGroup;
    std::vector<double> prefix((num_rows + 1) * prefix_row, 0.0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups_per_batch;
      const int64_t c0 = (task % groups_per_batch) * kGroup;
      const int64_t group = std::min(kGroup, channels - c0);
      const acc_t* group_cells = cell_data + b * channels * num_cells + c0 * cell_stride_c;
      for (int64_t i = 0; i < num_rows; ++i) {
        for (int64_t j = 0; j < num_cols; ++j) {
          const acc_t* cell = group_cells + (i * num_cols + j) * cell_stride_cell;
          double* here = prefix.data() + (i + 1) * prefix_row + (j + 1) * kGroup;
          const double* up = here - prefix_row;
          const double* left = here - kGroup;
          const double* up_left = up - kGroup;
          for (int64_t c = 0; c < group; ++c) {
            here[c] = static_cast<double>(cell[c * cell_stride_c]) + up[c] + left[c] - up_left[c];
          }
        }
      }
      int64_t bin = 0;
      for (size_t k = 0; k < scales.size(); ++k) {
        for (int64_t oh = 0; oh < scales[k]; ++oh) {
          const int64_t rb = rows.bin_offset[k] + oh;
          const double* top = prefix.data() + rows.bin_first_segment[rb] * prefix_row;
          const double* bottom = prefix.data() + rows.bin_end_segment[rb] * prefix_row;
          for (int64_t ow = 0; ow < scales[k]; ++ow, ++bin) {
            const int64_t cb = cols.bin_offset[k] + ow;
            const int64_t left = cols.bin_first_segment[cb] * kGroup, right = cols.bin_end_segment[cb] * kGroup;
            const double area = static_cast<double>(rows.bin_length[rb] * cols.bin_length[cb]);
            scalar_t* out = output_data + (b * channels + c0) * pyramid + bin;
            for (int64_t c = 0; c < group; ++c) {
              const double sum = bottom[right + c] - bottom[left + c] - top[right + c] + top[left + c];
              out[c * pyramid] = static_cast<scalar_t>(static_cast<acc_t>(sum / area));
            }
          }
        }
      }
    }
  });
}

// Backward, a gather. Parallel over planes (batch, channel); each writes its contiguous [H, W] plane of
// grad_input exactly once, so there are no atomics and the result does not depend on threads.
// A cell's gradient is the sum, over scales in order, of grad / area of the (at most 2 x 2) bins that
// contain the cell; it is accumulated in acc_t (fp32, fp64 for fp64), then written to each pixel.
template <typename scalar_t>
void pyramid_pool_backward_kernel(const at::Tensor& grad_output, c10::IntArrayRef scales, const AxisSegments& rows,
                                  const AxisSegments& cols, at::Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = grad_output.size(1), pyramid = grad_output.size(2);
  const int64_t stride_b = grad_output.stride(0), stride_c = grad_output.stride(1), stride_s = grad_output.stride(2);
  const int64_t height = grad_input.size(2), width = grad_input.size(3);
  const int64_t num_rows = rows.num_segments(), num_cols = cols.num_segments();
  const int64_t num_scales = static_cast<int64_t>(scales.size());

  // For every (scale, segment): the bins containing the segment, [first, end), at most two.
  auto containing_bins = [&](const AxisSegments& axis) {
    std::vector<int64_t> first(num_scales * axis.num_segments()), last(num_scales * axis.num_segments());
    for (int64_t k = 0; k < num_scales; ++k) {
      for (int64_t j = 0; j < axis.num_segments(); ++j) {
        int64_t lo = scales[k], hi = 0;
        for (int64_t o = 0; o < scales[k]; ++o) {
          const int64_t bin = axis.bin_offset[k] + o;
          if (axis.bin_first_segment[bin] <= j && j < axis.bin_end_segment[bin]) {
            lo = std::min(lo, o);
            hi = std::max(hi, o + 1);
          }
        }
        first[k * axis.num_segments() + j] = lo;
        last[k * axis.num_segments() + j] = hi;
      }
    }
    return std::make_pair(first, last);
  };
  const auto [row_first, row_end] = containing_bins(rows);
  const auto [col_first, col_end] = containing_bins(cols);
  std::vector<int64_t> scale_offset(num_scales, 0);
  for (int64_t k = 1; k < num_scales; ++k) scale_offset[k] = scale_offset[k - 1] + scales[k - 1] * scales[k - 1];

  const scalar_t* grad_data = grad_output.const_data_ptr<scalar_t>();
  scalar_t* grad_input_data = grad_input.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, grad_output.size(0) * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_per_area(pyramid);
    std::vector<acc_t> cell_grad(num_rows * num_cols);
    std::vector<scalar_t> row_values(width);
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* grad = grad_data + (plane / channels) * stride_b + (plane % channels) * stride_c;
      for (int64_t k = 0, bin = 0; k < num_scales; ++k) {
        for (int64_t oh = 0; oh < scales[k]; ++oh) {
          for (int64_t ow = 0; ow < scales[k]; ++ow, ++bin) {
            const int64_t area = rows.bin_length[rows.bin_offset[k] + oh] * cols.bin_length[cols.bin_offset[k] + ow];
            grad_per_area[bin] = static_cast<acc_t>(grad[bin * stride_s]) / static_cast<acc_t>(area);
          }
        }
      }
      for (int64_t i = 0; i < num_rows; ++i) {
        for (int64_t j = 0; j < num_cols; ++j) {
          acc_t sum = 0;
          for (int64_t k = 0; k < num_scales; ++k) {
            const acc_t* scale_grad = grad_per_area.data() + scale_offset[k];
            for (int64_t oh = row_first[k * num_rows + i]; oh < row_end[k * num_rows + i]; ++oh) {
              for (int64_t ow = col_first[k * num_cols + j]; ow < col_end[k * num_cols + j]; ++ow) {
                sum += scale_grad[oh * scales[k] + ow];
              }
            }
          }
          cell_grad[i * num_cols + j] = sum;
        }
      }
      scalar_t* out = grad_input_data + plane * height * width;
      for (int64_t i = 0; i < num_rows; ++i) {
        for (int64_t j = 0; j < num_cols; ++j) {
          std::fill(row_values.begin() + cols.edges[j], row_values.begin() + cols.edges[j + 1],
                    static_cast<scalar_t>(cell_grad[i * num_cols + j]));
        }
        for (int64_t h = rows.edges[i]; h < rows.edges[i + 1]; ++h) {
          std::memcpy(out + h * width, row_values.data(), width * sizeof(scalar_t));
        }
      }
    }
  });
}

at::Tensor pyramid_pool_forward_segments(const at::Tensor& input, c10::IntArrayRef scales, const AxisSegments& rows,
                                        const AxisSegments& cols) {
  at::Tensor output = at::empty({input.size(0), input.size(1), pyramid_size(scales)}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "pyramid_pool_forward_cpu", [&] {
    pyramid_pool_forward_kernel<scalar_t>(input, scales, rows, cols, output);
  });
  return output;
}

at::Tensor pyramid_pool_forward_cpu(const at::Tensor& input, c10::IntArrayRef scales) {
  ANNK_CHECK_DIM(input, 4);
  ANNK_CHECK_FLOATING(input);
  ANNK_CHECK_DEVICE(input, at::Device(at::kCPU));
  ANNK_CHECK_NONEMPTY(input);
  pyramid_size(scales);
  return pyramid_pool_forward_segments(input, scales, make_axis_segments(input.size(2), scales),
                                       make_axis_segments(input.size(3), scales));
}

// Each map is one parallel pass, as on its own: a CPU pays no launch per map, so only the segments are shared
// (here and in the pair backward).
std::tuple<at::Tensor, at::Tensor> pyramid_pool_pair_forward_cpu(const at::Tensor& first, const at::Tensor& second,
                                                                 c10::IntArrayRef scales) {
  check_pyramid_pair_inputs(first, second);
  ANNK_CHECK_DEVICE(first, at::Device(at::kCPU));
  pyramid_size(scales);
  const AxisSegments rows = make_axis_segments(first.size(2), scales);
  const AxisSegments cols = make_axis_segments(first.size(3), scales);
  return {pyramid_pool_forward_segments(first, scales, rows, cols),
          pyramid_pool_forward_segments(second, scales, rows, cols)};
}

at::Tensor pyramid_pool_backward_segments(const at::Tensor& grad_output, c10::IntArrayRef scales, int64_t height,
                                         int64_t width, const AxisSegments& rows, const AxisSegments& cols) {
  at::Tensor grad_input =
      at::empty({grad_output.size(0), grad_output.size(1), height, width}, grad_output.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "pyramid_pool_backward_cpu",
      [&] { pyramid_pool_backward_kernel<scalar_t>(grad_output, scales, rows, cols, grad_input); });
  return grad_input;
}

at::Tensor pyramid_pool_backward_cpu(const at::Tensor& grad_output, c10::IntArrayRef scales, int64_t height,
                                     int64_t width) {
  check_pyramid_backward_inputs(grad_output, scales, height, width, at::Device(at::kCPU));
  return pyramid_pool_backward_segments(grad_output, scales, height, width, make_axis_segments(height, scales),
                                        make_axis_segments(width, scales));
}

std::tuple<at::Tensor, at::Tensor> pyramid_pool_pair_backward_cpu(const at::Tensor& grad_first,
                                                                  const at::Tensor& grad_second,
                                                                  c10::IntArrayRef scales, int64_t height,
                                                                  int64_t width) {
  ANNK_CHECK_DEVICE(grad_first, at::Device(at::kCPU));
  check_pyramid_pair_backward_inputs(grad_first, grad_second, scales, height, width);
  const AxisSegments rows = make_axis_segments(height, scales);
  const AxisSegments cols = make_axis_segments(width, scales);
  return {pyramid_pool_backward_segments(grad_first, scales, height, width, rows, cols),
          pyramid_pool_backward_segments(grad_second, scales, height, width, rows, cols)};
}

}  // namespace

TORCH_LIBRARY_IMPL(annkernels, CPU, m) {
  m.impl("_pyramid_pool_forward", &pyramid_pool_forward_cpu);
  m.impl("_pyramid_pool_pair_forward", &pyramid_pool_pair_forward_cpu);
  m.impl("_pyramid_pool_backward", &pyramid_pool_backward_cpu);
  m.impl("_pyramid_pool_pair_backward", &pyramid_pool_pair_backward_cpu);
}

}  // namespace annkernels
