// The ABI version of the project's CUDA kernel library (plugins/kernels) this runtime is built against.
// Its own translation unit: adafuse_kernels.h and adafuse/runtime.h both define adafuse_status.
#pragma once

namespace adafuse {

// ADAFUSE_KERNELS_ABI_VERSION of plugins/kernels/include/adafuse_kernels.h, which is what the library's
// adafuse_abi_version() returns; a native artifact records the version it was written for.
int kernel_abi_version();

}  // namespace adafuse
