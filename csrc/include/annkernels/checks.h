// Argument checks shared by the CPU and CUDA glue. Messages name the argument, so an error
// raised from deep inside torch.ops still tells the user which tensor is wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#define ANNK_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have " #n " dimensions, got shape ", (x).sizes())
#define ANNK_CHECK_FLOATING(x)                                                                   \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", \
              (x).scalar_type())
#define ANNK_CHECK_SAME_DTYPE(x, y)                                                                     \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same dtype, got ", \
              (x).scalar_type(), " and ", (y).scalar_type())
#define ANNK_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define ANNK_CHECK_NONEMPTY(x) TORCH_CHECK((x).numel() > 0, #x " must not be empty, got shape ", (x).sizes())

namespace annkernels {

// The blocks hand the attention channel-first views, x.flatten(2).transpose(1, 2): [B, N, D] with
// stride (D*N, 1, N). Outputs and gradients take the layout of the tensor they mirror, so the
// block's transpose back to [B, D, H, W] is free. Mirrored by annkernels/ops/short_attention.py.
inline bool is_channel_first(const at::Tensor& t) {
  return t.size(1) > 1 && t.size(2) > 1 && t.stride(1) == 1;
}

inline at::Tensor empty_like_layout(const at::Tensor& like, int64_t batch, int64_t rows, int64_t cols,
                                    at::ScalarType dtype) {
  auto options = like.options().dtype(dtype);
  if (is_channel_first(like)) {
    return at::empty({batch, cols, rows}, options).transpose(1, 2);
  }
  return at::empty({batch, rows, cols}, options);
}

// S = sum of s*s over the scales; scales are validated here as well as in Python.
inline int64_t pyramid_size(c10::IntArrayRef scales) {
  TORCH_CHECK(!scales.empty(), "scales must not be empty");
  int64_t total = 0;
  for (int64_t s : scales) {
    TORCH_CHECK(s > 0, "scales must be positive, got ", scales);
    total += s * s;
  }
  return total;
}

}  // namespace annkernels
