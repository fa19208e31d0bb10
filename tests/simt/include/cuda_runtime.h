// Stand-in for the toolkit's <cuda_runtime.h> under the SIMT emulator: the toolkit's types and host API
// declarations (implemented by the emulator's runtime), plus the emulated device built-ins.
#pragma once

#include <cuda_runtime_api.h>

#include "simt_device.h"

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, value);
}
