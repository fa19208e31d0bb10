// Host side of the emulator's probes: each probe file holds small kernels, with correct and buggy
// variants, and C entry points that launch them (loaded with ctypes by tests/simt/probe.py).
#pragma once

#include <cuda_runtime.h>

#if defined(__CUDACC__)
// nvcc compiles the probes too, to show the emulated headers match the toolkit's signatures.
template <typename... Params, typename... Args>
static cudaError_t launch_probe(const char*, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                Args... args) {
  kernel<<<grid, block, smem>>>(args...);
  return cudaGetLastError();
}
#else
extern "C" int simt_bind_module(const void* address_in_module, void* const* dynamic, const size_t* capacity,
                                int count);
// Defined by the build, one buffer per `extern __shared__` array of the probe's kernels.
extern "C" int simt_dynamic_shared_buffers(void** bases, size_t* capacities, int max_count);

// Binds this module's thread-local segment (its kernels' shared memory). Internal linkage: every probe
// library must find its own copy, not the first one loaded.
static int bind_probe_module() {
  // glibc allocates a loaded library's thread-local block at its first use, and binding looks it up: use it.
  static thread_local unsigned char first_use;
  const void* volatile allocate = &first_use;
  (void)allocate;
  void* bases[8];
  size_t capacities[8];
  const int count = simt_dynamic_shared_buffers(bases, capacities, 8);
  return simt_bind_module(reinterpret_cast<const void*>(&bind_probe_module), bases, capacities, count);
}

template <typename... Params, typename... Args>
static cudaError_t launch_probe(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                Args... args) {
  if (bind_probe_module() != 0) {
    return cudaErrorInitializationError;
  }
  return simt::launch_kernel(name, kernel, grid, block, smem, args...);
}
#endif
