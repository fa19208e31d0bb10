// Stand-in for the toolkit's <cuda_pipeline_primitives.h> under the SIMT emulator: asynchronous copies from
// global to shared memory (cp.async), with the toolkit's signatures so the same kernel compiles with nvcc.
//
// Each thread keeps its own batches, as on a GPU. __pipeline_memcpy_async checks the copy (4, 8 or 16
// bytes, zfill at most the size, both pointers aligned to the size, destination in shared and source in
// global memory), reads the source's bounds, checks the destination as a write of this thread, then
// poisons it: until the copy lands, any access to those bytes is reported. __pipeline_commit closes the
// open batch; __pipeline_wait_prior(N) lands every batch but the N most recent committed ones, copying
// then (the thread's write to shared memory, with the usual race checks). Copies not yet committed are
// not waited for, as cp.async.wait_group leaves them. So a missing commit or wait shows up as a read of
// bytes still in flight, and a missing __syncthreads after the wait as a race.
#pragma once

#include <cstddef>

#include "simt_device.h"

SIMT_UNCHECKED inline void __pipeline_memcpy_async(void* __restrict__ dst_shared, const void* __restrict__ src_global,
                                                   size_t size_and_align, size_t zfill = 0) {
  simt::async_copy_issue(dst_shared, src_global, size_and_align, zfill);
}

SIMT_UNCHECKED inline void __pipeline_commit() { simt::async_copy_commit(); }

SIMT_UNCHECKED inline void __pipeline_wait_prior(size_t prior) { simt::async_copy_wait(prior); }
