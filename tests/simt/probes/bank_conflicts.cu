// Shared-memory bank conflicts as the emulator counts them (simt_count_shared_wavefronts): one warp stores a
// value per lane in a chosen pattern, then loads it back after a barrier, so each pattern makes two warp
// requests whose wavefronts the test knows.
#include "probe.h"

#include <cuda_fp16.h>

namespace {

enum Pattern {
  kConsecutiveWords = 0,  // lane l at word l: one wavefront
  kSameBank = 1,          // lane l at word 32 l: all in bank 0, 32 wavefronts
  kPaddedColumn = 2,      // lane l at word 33 l: a column of a 33-word-padded tile, one wavefront
  kVectors = 3,           // 16 bytes per lane, consecutive: 512 bytes in four 128-byte phases
  kHalvesInPairs = 4,     // 2 bytes per lane, consecutive: two lanes per word, one wavefront
  kHalfColumn = 5,        // 2 bytes per lane, rows of 72 halves (36 words): lanes 8 apart share a bank, 4 wavefronts
};

constexpr int kLanes = 32;

__global__ void bank_probe_kernel(float* out, int pattern) {
  __shared__ __align__(16) float staging[kLanes * 36];
  const int lane = threadIdx.x;
  float value = 0.0f;
  if (pattern == kVectors) {
    float4* slot = reinterpret_cast<float4*>(staging) + lane;
    *slot = make_float4(lane, lane, lane, lane);
    __syncthreads();
    const float4 loaded = *slot;  // one 16-byte load
    value = loaded.w;
  } else if (pattern == kHalvesInPairs || pattern == kHalfColumn) {
    __half* slot = reinterpret_cast<__half*>(staging) + (pattern == kHalvesInPairs ? lane : lane * 72);
    *slot = __float2half(lane);
    __syncthreads();
    value = __half2float(*slot);
  } else {
    const int stride = pattern == kConsecutiveWords ? 1 : pattern == kSameBank ? 32 : 33;
    float* slot = staging + lane * stride;
    *slot = lane;
    __syncthreads();
    value = *slot;
  }
  out[lane] = value;
}

}  // namespace

// `out` holds 32 floats: lane l writes l.
extern "C" int probe_bank_conflicts(int pattern, float* out) {
  return launch_probe("bank_probe_kernel", bank_probe_kernel, dim3(1), dim3(kLanes), 0, out, pattern);
}
