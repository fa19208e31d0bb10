// Schemas of the C++ kernel operators. The annkernels namespace has two layers:
//  - these private kernel ops (leading underscore), one forward and one backward per op, implemented per
//    device by the backend files (csrc/cpu, csrc/cuda: TORCH_LIBRARY_IMPL blocks only);
//  - the public custom ops annkernels::pyramid_pool(_grad) and annkernels::short_attention(_grad), defined
//    from Python (annkernels/ops/*.py) with torch.library.custom_op. They take a backend name, carry the
//    fake kernels and autograd, and call a kernel op here or its Triton twin (annkernels/triton).
#include <Python.h>
#include <torch/library.h>

// Importing annkernels._C only has to load this library so the registrations below run.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(annkernels, m) {
  // input [B, C, H, W] (any strides) -> [B, C, S], S = sum(s * s), adaptive-average bins per scale.
  m.def("_pyramid_pool_forward(Tensor input, int[] scales) -> Tensor");
  // Two maps of one batch and size (APNB/AFNB: the key map and the value source) -> the forward of each,
  // and their two gradients -> the backward of each, in one pass; one launch on the GPU.
  m.def("_pyramid_pool_pair_forward(Tensor first, Tensor second, int[] scales) -> (Tensor, Tensor)");
  m.def(
      "_pyramid_pool_pair_backward(Tensor grad_first, Tensor grad_second, int[] scales, SymInt height, SymInt width) "
      "-> (Tensor, Tensor)");
  // grad_output [B, C, S] -> grad_input [B, C, height, width], contiguous.
  m.def("_pyramid_pool_backward(Tensor grad_output, int[] scales, SymInt height, SymInt width) -> Tensor");
  // query [B, N, Dk], key [B, S, Dk], value [B, S, Dv] -> (out [B, N, Dv], softmax_state).
  // out takes query's layout (empty_like_layout in annkernels/checks.h). softmax_state is what the same
  // backend's backward needs. The CPU keeps the probabilities P, [B, N, S rounded up to a multiple of 8]
  // (float32; float64 for float64 inputs): smaller than Q at S = 110, and cheaper than a recomputing GEMM.
  // The GPU kernels keep the row log-sum-exp of the scaled scores, [B, N] float32, and recompute P on chip.
  m.def("_short_attention_forward(Tensor query, Tensor key, Tensor value, float scale) -> (Tensor, Tensor)");
  // -> (grad_query, grad_key, grad_value), each in the layout of the matching input.
  m.def(
      "_short_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor softmax_state, float scale) -> (Tensor, Tensor, Tensor)");
  // The multiple the CPU kernels pad the key axis of their softmax state to ("rounded up" above), read
  // once by the fake kernel (annkernels/ops/short_attention.py) so the state's shape is defined in one place.
  m.def("_short_attention_cpu_key_alignment() -> int");
}
