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

// query [B, N, Dk], key [B, S, Dk], value [B, S, Dv]: 3-D, non-empty, one floating dtype, all on `device`,
// shapes that agree. Each backend adds its own limits (dtypes, sizes) after this.
inline void check_attention_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const at::Device& device) {
  ANNK_CHECK_DIM(query, 3);
  ANNK_CHECK_DIM(key, 3);
  ANNK_CHECK_DIM(value, 3);
  ANNK_CHECK_FLOATING(query);
  ANNK_CHECK_SAME_DTYPE(query, key);
  ANNK_CHECK_SAME_DTYPE(query, value);
  ANNK_CHECK_DEVICE(query, device);
  ANNK_CHECK_DEVICE(key, device);
  ANNK_CHECK_DEVICE(value, device);
  ANNK_CHECK_NONEMPTY(query);
  ANNK_CHECK_NONEMPTY(key);
  ANNK_CHECK_NONEMPTY(value);
  TORCH_CHECK(key.size(0) == query.size(0) && key.size(2) == query.size(2), "key must have shape [B, S, Dk] = [",
              query.size(0), ", S, ", query.size(2), "] to match query ", query.sizes(), ", got ", key.sizes());
  TORCH_CHECK(value.size(0) == key.size(0) && value.size(1) == key.size(1), "value must have shape [B, S, Dv] = [",
              key.size(0), ", ", key.size(1), ", Dv] to match key ", key.sizes(), ", got ", value.sizes());
}

// The attention backward's grad_out [B, N, Dv] and the forward's out, once check_attention_inputs passed.
inline void check_attention_grad_out(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& query,
                                     const at::Tensor& value) {
  ANNK_CHECK_DIM(grad_out, 3);
  ANNK_CHECK_SAME_DTYPE(query, grad_out);
  ANNK_CHECK_DEVICE(grad_out, query.device());
  ANNK_CHECK_DEVICE(out, query.device());
  const int64_t batch = query.size(0), queries = query.size(1), value_dim = value.size(2);
  TORCH_CHECK(grad_out.size(0) == batch && grad_out.size(1) == queries && grad_out.size(2) == value_dim,
              "grad_out must have shape [B, N, Dv] = [", batch, ", ", queries, ", ", value_dim, "], got ",
              grad_out.sizes());
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "out must have shape ", grad_out.sizes(), ", got ", out.sizes());
}

// Pyramid pooling's backward: grad_output [B, C, S] on `device` back to [B, C, height, width]. Returns S.
inline int64_t check_pyramid_backward_inputs(const at::Tensor& grad_output, c10::IntArrayRef scales, int64_t height,
                                             int64_t width, const at::Device& device) {
  ANNK_CHECK_DIM(grad_output, 3);
  ANNK_CHECK_FLOATING(grad_output);
  ANNK_CHECK_DEVICE(grad_output, device);
  ANNK_CHECK_NONEMPTY(grad_output);
  TORCH_CHECK(height > 0 && width > 0, "height and width must be positive, got ", height, " and ", width);
  const int64_t pyramid = pyramid_size(scales);
  TORCH_CHECK(grad_output.size(2) == pyramid, "grad_output must have shape [B, C, ", pyramid, "] for scales ",
              scales, ", got ", grad_output.sizes());
  return pyramid;
}

// The two maps of a pair pooling: 4-D, non-empty, one dtype and device, the same batch, height and width
// (channel counts and layouts may differ).
inline void check_pyramid_pair_inputs(const at::Tensor& first, const at::Tensor& second) {
  ANNK_CHECK_DIM(first, 4);
  ANNK_CHECK_DIM(second, 4);
  ANNK_CHECK_FLOATING(first);
  ANNK_CHECK_SAME_DTYPE(first, second);
  ANNK_CHECK_DEVICE(second, first.device());
  ANNK_CHECK_NONEMPTY(first);
  ANNK_CHECK_NONEMPTY(second);
  TORCH_CHECK(first.size(0) == second.size(0) && first.size(2) == second.size(2) && first.size(3) == second.size(3),
              "first and second must share batch, height and width, got shapes ", first.sizes(), " and ",
              second.sizes());
}

// The two gradients of a pair pooling's backward: each a valid pyramid gradient, one dtype, device and batch.
inline void check_pyramid_pair_backward_inputs(const at::Tensor& grad_first, const at::Tensor& grad_second,
                                               c10::IntArrayRef scales, int64_t height, int64_t width) {
  check_pyramid_backward_inputs(grad_first, scales, height, width, grad_first.device());
  check_pyramid_backward_inputs(grad_second, scales, height, width, grad_first.device());
  ANNK_CHECK_SAME_DTYPE(grad_first, grad_second);
  TORCH_CHECK(grad_first.size(0) == grad_second.size(0), "grad_first and grad_second must share the batch, got shapes ",
              grad_first.sizes(), " and ", grad_second.sizes());
}

}  // namespace annkernels
