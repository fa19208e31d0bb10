// Planted regressions for tests/test_perf_gate.py: the gate must fail on these and pass on their fixes.
// Compiled by tools/gpu/cuda_static.py exactly as csrc/cuda is (nvcc for sm_90a, SASS read the same way).

constexpr int kThreads = 128;
constexpr int kBatch = 8;  // loads each thread issues before the first shared store

// Waits on every load: each element goes from global to shared memory before the next load issues.
__global__ void __launch_bounds__(kThreads) serial_loader(float* out, const float* __restrict__ src, int n) {
  __shared__ float tile[kThreads * kBatch];
  for (int base = 0; base < n; base += kThreads * kBatch) {
    for (int e = threadIdx.x; e < kThreads * kBatch; e += kThreads) {
      tile[e] = base + e < n ? src[base + e] : 0.0f;
    }
    __syncthreads();
    out[base + threadIdx.x] = tile[(threadIdx.x * 7) % (kThreads * kBatch)];
    __syncthreads();
  }
}

// The fix: every load of a stage issues into registers before any shared store.
__global__ void __launch_bounds__(kThreads) batched_loader(float* out, const float* __restrict__ src, int n) {
  __shared__ float tile[kThreads * kBatch];
  for (int base = 0; base < n; base += kThreads * kBatch) {
    float staged[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int e = base + i * kThreads + threadIdx.x;
      staged[i] = e < n ? src[e] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      tile[i * kThreads + threadIdx.x] = staged[i];
    }
    __syncthreads();
    out[base + threadIdx.x] = tile[(threadIdx.x * 7) % (kThreads * kBatch)];
    __syncthreads();
  }
}
