// C entry points to the raw-pointer launchers of csrc/cuda, for the emulated tests (loaded with ctypes).
// Compiled without instrumentation: this is host code, as the torch glue is on a GPU build.
#include <cstdint>
#include <cstring>

#include "pyramid_pool.h"
#include "short_attention.h"

using namespace annkernels::cuda_kernels;

extern "C" int simt_bind_module(const void* address_in_module, void* const* dynamic, const size_t* capacity,
                                int count);
// Defined by the build, one buffer per `extern __shared__` array of the kernels.
extern "C" int simt_dynamic_shared_buffers(void** bases, size_t* capacities, int max_count);

namespace {

// Binds this module's thread-local segment (the kernels' shared memory) before every launcher call.
int bind() {
  void* bases[8];
  size_t capacities[8];
  const int count = simt_dynamic_shared_buffers(bases, capacities, 8);
  return simt_bind_module(reinterpret_cast<const void*>(&bind), bases, capacities, count);
}

ConstView3 const_view(const void* data, const int64_t strides[3]) { return {data, strides[0], strides[1], strides[2]}; }
View3 view(void* data, const int64_t strides[3]) { return {data, strides[0], strides[1], strides[2]}; }
AttentionShape attention_shape(const int64_t shape[5]) { return {shape[0], shape[1], shape[2], shape[3], shape[4]}; }

PyramidScales pyramid_scales(int count, const int* sizes) {
  PyramidScales scales{};
  scales.count = count;
  for (int k = 0; k < count && k < kMaxPyramidScales; ++k) {
    scales.sizes[k] = sizes[k];
  }
  return scales;
}

}  // namespace

extern "C" {

// Map m has sizes[4m .. 4m+4) = [batch, channels, height, width], strides[4m .. 4m+4), inputs[m] and outputs[m].
int simt_pyramid_pool_forward(int dtype, int map_count, const int64_t* sizes, const int64_t* strides,
                              const void* const* inputs, void* const* outputs, int scale_count, const int* scales) {
  if (bind() != 0) {
    return cudaErrorInitializationError;
  }
  PoolMap maps[kMaxPoolMaps] = {};
  for (int m = 0; m < map_count && m < kMaxPoolMaps; ++m) {
    maps[m] = {inputs[m], sizes[4 * m + 1], {strides[4 * m], strides[4 * m + 1], strides[4 * m + 2], strides[4 * m + 3]},
               outputs[m]};
  }
  return pyramid_pool_forward(static_cast<DType>(dtype), maps, map_count, sizes[0], sizes[2], sizes[3],
                              pyramid_scales(scale_count, scales), nullptr);
}

// Map m has grad_output inputs[m] with grad_strides[3m .. 3m+3) and channels channels[m]; grad_input outputs[m].
// sizes = [batch, height, width].
int simt_pyramid_pool_backward(int dtype, int map_count, const int64_t sizes[3], const int64_t* channels,
                               const int64_t* grad_strides, const void* const* inputs, void* const* outputs,
                               int scale_count, const int* scales) {
  if (bind() != 0) {
    return cudaErrorInitializationError;
  }
  PoolMapGrad maps[kMaxPoolMaps] = {};
  for (int m = 0; m < map_count && m < kMaxPoolMaps; ++m) {
    maps[m] = {const_view(inputs[m], grad_strides + 3 * m), channels[m], outputs[m]};
  }
  return pyramid_pool_backward(static_cast<DType>(dtype), maps, map_count, sizes[0], pyramid_scales(scale_count, scales),
                               sizes[1], sizes[2], nullptr);
}

int simt_short_attention_forward(int dtype, const int64_t shape[5], const void* query, const int64_t query_strides[3],
                                 const void* key, const int64_t key_strides[3], const void* value,
                                 const int64_t value_strides[3], float scale, void* out, const int64_t out_strides[3],
                                 float* logsumexp) {
  if (bind() != 0) {
    return cudaErrorInitializationError;
  }
  return short_attention_forward(static_cast<DType>(dtype), attention_shape(shape), const_view(query, query_strides),
                                 const_view(key, key_strides), const_view(value, value_strides), scale,
                                 view(out, out_strides), logsumexp, nullptr);
}

// The plan's field names in order, comma-separated: the Python side lays out its int64 array by them.
const char* simt_short_attention_backward_plan_fields() {
#define ANNK_PLAN_NAME(name) #name ","
  return ANNK_ATTENTION_BACKWARD_PLAN_FIELDS(ANNK_PLAN_NAME);
#undef ANNK_PLAN_NAME
}

// AttentionBackwardPlan is all int64_t, so the Python side passes it as an int64 array.
static_assert(sizeof(AttentionBackwardPlan) % sizeof(int64_t) == 0 && alignof(AttentionBackwardPlan) == alignof(int64_t),
              "AttentionBackwardPlan must be a plain run of int64_t fields");

int simt_short_attention_backward_plan(int dtype, const int64_t shape[5], AttentionBackwardPlan* plan) {
  return short_attention_backward_plan(static_cast<DType>(dtype), attention_shape(shape), plan);
}

int simt_short_attention_backward(int dtype, const int64_t shape[5], const void* grad_out,
                                  const int64_t grad_out_strides[3], const void* query, const int64_t query_strides[3],
                                  const void* key, const int64_t key_strides[3], const void* value,
                                  const int64_t value_strides[3], float scale, void* grad_query,
                                  const int64_t grad_query_strides[3], void* grad_key, const int64_t grad_key_strides[3],
                                  void* grad_value, const int64_t grad_value_strides[3],
                                  const AttentionBackwardPlan* plan, void* workspace) {
  if (bind() != 0) {
    return cudaErrorInitializationError;
  }
  return short_attention_backward(static_cast<DType>(dtype), attention_shape(shape),
                                  const_view(grad_out, grad_out_strides), const_view(query, query_strides),
                                  const_view(key, key_strides), const_view(value, value_strides), scale,
                                  view(grad_query, grad_query_strides), view(grad_key, grad_key_strides),
                                  view(grad_value, grad_value_strides), *plan, workspace, nullptr);
}

}  // extern "C"

// ---- Signatures ----
// Each entry point's parameter list as one letter per parameter, derived from its C++ type, so the ctypes
// side (tests/simt/__init__.py) builds its argtypes from the library instead of a hand-kept copy: a launcher
// parameter added here changes the string, and a Python call with the old argument list fails with ctypes'
// TypeError instead of passing garbage. A parameter type with no letter below does not compile.
//   i int   f float   l int64 array (sizes, strides, the all-int64 plan)   n int array   p data pointer
//   P array of data pointers
namespace {

template <typename T>
struct ParameterCode;
template <> struct ParameterCode<int> { static constexpr char code = 'i'; };
template <> struct ParameterCode<float> { static constexpr char code = 'f'; };
template <> struct ParameterCode<const int64_t*> { static constexpr char code = 'l'; };
template <> struct ParameterCode<const AttentionBackwardPlan*> { static constexpr char code = 'l'; };
template <> struct ParameterCode<AttentionBackwardPlan*> { static constexpr char code = 'l'; };
template <> struct ParameterCode<const int*> { static constexpr char code = 'n'; };
template <> struct ParameterCode<const void*> { static constexpr char code = 'p'; };
template <> struct ParameterCode<void*> { static constexpr char code = 'p'; };
template <> struct ParameterCode<float*> { static constexpr char code = 'p'; };
template <> struct ParameterCode<const void* const*> { static constexpr char code = 'P'; };
template <> struct ParameterCode<void* const*> { static constexpr char code = 'P'; };

template <typename... Parameters>
const char* parameter_codes(int (*)(Parameters...)) {
  static const char codes[] = {ParameterCode<Parameters>::code..., '\0'};
  return codes;
}

}  // namespace

#define SIMT_ENTRY_POINTS(X)                                                                              \
  X(simt_pyramid_pool_forward) X(simt_pyramid_pool_backward) X(simt_short_attention_forward)              \
      X(simt_short_attention_backward_plan) X(simt_short_attention_backward)

extern "C" {

// The entry points' names, comma-separated.
const char* simt_entry_points() {
#define SIMT_ENTRY_POINT_NAME(function) #function ","
  return SIMT_ENTRY_POINTS(SIMT_ENTRY_POINT_NAME);
#undef SIMT_ENTRY_POINT_NAME
}

// The parameter codes of entry point `name`, or nullptr if there is no such entry point.
const char* simt_signature(const char* name) {
#define SIMT_SIGNATURE(function)          \
  if (std::strcmp(name, #function) == 0) { \
    return parameter_codes(&function);     \
  }
  SIMT_ENTRY_POINTS(SIMT_SIGNATURE)
#undef SIMT_SIGNATURE
  return nullptr;
}

}  // extern "C"
