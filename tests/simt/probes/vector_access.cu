// Vector loads and stores, which a GPU requires to be aligned to their own size: each thread copies one
// 16-byte vector from global memory through shared memory back to global memory. Variant 0 is correct; the
// others plant one misaligned access each (the host would run every one of them silently).
#include "probe.h"

namespace {

enum Variant {
  kCorrect = 0,
  kGlobalLoadOffByOne = 1,  // the 16-byte load starts one float into the vector
  kSharedStoreOffByTwo = 2, // the 16-byte shared store starts two floats into the slot
  kGlobalStoreOffByThree = 3,// the 16-byte global store starts three floats into the vector
};

constexpr int kThreads = 32;

__global__ void vector_copy_kernel(const float* in, float* out, int variant) {
  __shared__ __align__(16) float staging[(kThreads + 1) * 4];
  const int t = threadIdx.x;
  const float* from = in + 4 * t + (variant == kGlobalLoadOffByOne ? 1 : 0);
  float* slot = staging + 4 * t + (variant == kSharedStoreOffByTwo ? 2 : 0);
  *reinterpret_cast<float4*>(slot) = *reinterpret_cast<const float4*>(from);
  __syncthreads();
  const float4 value = *reinterpret_cast<const float4*>(staging + 4 * t + (variant == kSharedStoreOffByTwo ? 2 : 0));
  *reinterpret_cast<float4*>(out + 4 * t + (variant == kGlobalStoreOffByThree ? 3 : 0)) = value;
}

}  // namespace

// `in` holds 4 * 32 + 4 floats, `out` 4 * 32 + 4.
extern "C" int probe_vector_access(int variant, const float* in, float* out) {
  return launch_probe("vector_copy_kernel", vector_copy_kernel, dim3(1), dim3(kThreads), 0, in, out, variant);
}
