#include "kernel_abi.h"

#include "adafuse_kernels.h"

namespace adafuse {

int kernel_abi_version() { return ADAFUSE_KERNELS_ABI_VERSION; }

}  // namespace adafuse
