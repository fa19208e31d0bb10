// Planted regression for tests/test_perf_gate.py: a kernel forced to spill. 64 live accumulators per thread
// against the 32-register cap that __launch_bounds__(256, 8) sets (65536 / (256 * 8)).
constexpr int kLive = 64;

__global__ void __launch_bounds__(256, 8) forced_spill(float* out, const float* __restrict__ src, int n) {
  float acc[kLive];
#pragma unroll
  for (int i = 0; i < kLive; ++i) {
    acc[i] = src[(threadIdx.x + i * 256) % n];
  }
  for (int step = 0; step < n; ++step) {
#pragma unroll
    for (int i = 0; i < kLive; ++i) {
      acc[i] = acc[i] * acc[(i + step) % kLive] + 1.0f;
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kLive; ++i) {
    sum += acc[i];
  }
  out[threadIdx.x] = sum;
}
