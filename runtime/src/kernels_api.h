// The kernel library's C ABI (plugins/kernels/include/adafuse_kernels.h) under namespace adafuse::kernels.
// Its status enum reuses the names of the runtime's public one (ADAFUSE_OK, ADAFUSE_ERR_CUDA, ...), so the
// two cannot both be global in one translation unit. The functions keep their C linkage: a function with C
// linkage declared in a namespace is the same function as the global one of that name.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>  // included here, outside the namespace; the header's own include is then a no-op

namespace adafuse::kernels {
#include "adafuse_kernels.h"
}  // namespace adafuse::kernels
