// Asynchronous copies (<cuda_pipeline_primitives.h>): two tiles of floats staged through shared memory (one
// static, one dynamic) in two batches, then read back by other threads. Variant 0 is correct; the others plant one bug each.
#include <cuda_pipeline_primitives.h>

#include "probe.h"

namespace {

enum Variant {
  kCorrect = 0,
  kNoWait = 1,          // the second batch is never waited for
  kNoCommit = 2,        // the second batch is never committed, so wait_prior(0) leaves it in flight
  kWaitTooFew = 3,      // wait_prior(2) where wait_prior(1) lands the first batch
  kMisalignedSource = 4,// 16-byte copies from a source 4 bytes off
  kNoBarrier = 5,       // waits, but reads other threads' copies without __syncthreads
  kBadSize = 6,         // a 12-byte copy
  kZeroFill = 7,        // correct: the last 8 bytes of every 16-byte copy of the second batch are zeros
  kSmallDynamic = 8,    // the launch's dynamic shared memory is 16 bytes short of the second tile
};

constexpr int kThreads = 64;
constexpr int kFloatsPerCopy = 4;
constexpr int kTile = kThreads * kFloatsPerCopy;

// out[i] = first[kTile - 1 - i] + second[kTile - 1 - i]: every thread reads what another thread copied.
__global__ void staged_sum_kernel(const float* in, float* out, int variant) {
  __shared__ __align__(16) float first[kTile];
  extern __shared__ __align__(16) float second[];  // kTile floats
  const int t = threadIdx.x;
  const float* source = in + (variant == kMisalignedSource ? 1 : 0);
  __pipeline_memcpy_async(&first[t * kFloatsPerCopy], source + t * kFloatsPerCopy, 16);
  __pipeline_commit();
  if (variant == kBadSize) {
    __pipeline_memcpy_async(&second[t * kFloatsPerCopy], source + kTile + t * kFloatsPerCopy, 12);
  } else {
    __pipeline_memcpy_async(&second[t * kFloatsPerCopy], source + kTile + t * kFloatsPerCopy, 16,
                            variant == kZeroFill ? 8 : 0);
  }
  if (variant != kNoCommit) {
    __pipeline_commit();
  }
  __pipeline_wait_prior(variant == kWaitTooFew ? 2 : 1);  // the first batch has landed
  __syncthreads();
  float first_value[kFloatsPerCopy];
  for (int e = 0; e < kFloatsPerCopy; ++e) {
    first_value[e] = first[kTile - 1 - (t * kFloatsPerCopy + e)];
  }
  if (variant != kNoWait) {
    __pipeline_wait_prior(0);
  }
  if (variant != kNoBarrier) {
    __syncthreads();
  }
  for (int e = 0; e < kFloatsPerCopy; ++e) {
    const int i = t * kFloatsPerCopy + e;
    out[i] = first_value[e] + second[kTile - 1 - i];
  }
}

}  // namespace

// `in` holds 2 * 256 + 1 floats, `out` 256.
extern "C" int probe_async_copy(int variant, const float* in, float* out) {
  const size_t dynamic_smem = kTile * sizeof(float) - (variant == kSmallDynamic ? 16 : 0);
  return launch_probe("staged_sum_kernel", staged_sum_kernel, dim3(1), dim3(kThreads), dynamic_smem, in, out,
                      variant);
}
