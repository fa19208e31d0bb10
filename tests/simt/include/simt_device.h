// Device side of the SIMT emulator: what a kernel compiled by g++ instead of nvcc sees in place of the
// CUDA built-ins. Thread indices, barriers and warp collectives call into the runtime (runtime.cpp),
// which runs the threads of a block as cooperative fibers. Everything defined here is exempt from the
// memory-access instrumentation that checks the kernel's own loads and stores; explicit checks stand
// in where the emulator touches memory on a kernel's behalf (fragment loads and stores).
#pragma once

#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>

#define SIMT_UNCHECKED __attribute__((no_sanitize_address))

// Every __shared__ variable is thread-local to the host thread running the block: static ones get block
// scope storage, and `extern __shared__ T name[]` resolves to a buffer the build defines per name. The
// runtime treats the kernel module's whole thread-local segment as the block's shared memory.
#undef __shared__
#define __shared__ thread_local
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

namespace simt {

uint3 thread_index();
uint3 block_index();
dim3 block_dim();
dim3 grid_dim();
int lane_id();

void sync_block();

// One warp-wide step: every live lane hands in `mine`; when the last one arrives, `combine` runs once
// over all 32 contributions (null for lanes that have exited or do not exist), then all continue.
using Combine = void (*)(void* const* lanes, int live_lanes);
void warp_collective(unsigned mask, void* mine, Combine combine);

// Checks one access the emulator makes for the kernel (as the instrumentation does for the kernel's own).
void check_access(const void* address, size_t bytes, bool is_write);
void report_misuse(const char* what);

// The placement of a fragment type's elements across lanes (see mma.h): `elements` indices, a seeded
// permutation of 0..elements-1 per key, the identity under seed 0.
const int* fragment_placement(uint64_t key, int elements);

// Asynchronous copies (<cuda_pipeline_primitives.h>): issue, commit the open batch, wait for all but the
// `prior` most recent committed batches.
void async_copy_issue(void* dst_shared, const void* src_global, size_t size_and_align, size_t zfill);
void async_copy_commit();
void async_copy_wait(size_t prior);

// Copies without instrumentation (kernel arguments onto the fiber's stack).
void copy_unchecked(void* dst, const void* src, size_t bytes);

struct LaunchRequest {
  const char* kernel;
  const void* kernel_id;
  dim3 grid;
  dim3 block;
  size_t dynamic_smem;
  void (*run)(const void* bound);
  const void* bound;
  size_t bound_bytes;
};
cudaError_t launch(const LaunchRequest& request);

template <typename... Params>
struct BoundKernel {
  void (*kernel)(Params...);
  std::tuple<Params...> params;
};

// Runs on each fiber: its own copy of the arguments lives on its own stack, as parameters do on a GPU.
template <typename... Params>
SIMT_UNCHECKED void run_bound(const void* bound) {
  alignas(BoundKernel<Params...>) unsigned char local[sizeof(BoundKernel<Params...>)];
  copy_unchecked(local, bound, sizeof(local));
  const auto& copy = *reinterpret_cast<const BoundKernel<Params...>*>(local);
  std::apply(copy.kernel, copy.params);
}

template <typename... Params, typename... Args>
SIMT_UNCHECKED cudaError_t launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                                         size_t dynamic_smem, Args... args) {
  const BoundKernel<Params...> bound{kernel, std::tuple<Params...>(static_cast<Params>(args)...)};
  return launch(LaunchRequest{name, reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem,
                              &run_bound<Params...>, &bound, sizeof(bound)});
}

template <typename T>
struct ShuffleSlot {
  T value;
  T result;
  int source;
};

template <typename T>
SIMT_UNCHECKED void shuffle_combine(void* const* lanes, int) {
  for (int lane = 0; lane < 32; ++lane) {
    auto* slot = static_cast<ShuffleSlot<T>*>(lanes[lane]);
    if (slot == nullptr) {
      continue;
    }
    const auto* source = static_cast<ShuffleSlot<T>*>(lanes[slot->source & 31]);
    if (source == nullptr) {
      report_misuse("warp shuffle reads a lane that has exited or does not exist");
      continue;
    }
    slot->result = source->value;
  }
}

}  // namespace simt

#define threadIdx (::simt::thread_index())
#define blockIdx (::simt::block_index())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

SIMT_UNCHECKED inline void __syncthreads() { simt::sync_block(); }

SIMT_UNCHECKED inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::warp_collective(mask, reinterpret_cast<void*>(1), nullptr);
}

template <typename T>
SIMT_UNCHECKED T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  if (width != 32) {
    simt::report_misuse("__shfl_xor_sync: only width 32 is emulated");
  }
  simt::ShuffleSlot<T> slot{value, value, simt::lane_id() ^ lane_mask};
  simt::warp_collective(mask, &slot, &simt::shuffle_combine<T>);
  return slot.result;
}

SIMT_UNCHECKED inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// CUDA's integer min/max built-ins.
using std::max;
using std::min;
