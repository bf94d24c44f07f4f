// adafuseSwitchLinearKernels.h - small CUDA helpers owned by the AdafuseSwitchLinear plugin.
#ifndef ADAFUSE_SWITCH_LINEAR_KERNELS_H
#define ADAFUSE_SWITCH_LINEAR_KERNELS_H

#include "adafuse_kernels.h"

#include <cuda_runtime_api.h>

namespace adafuse
{
namespace plugin
{

//! y[r] = W x[r] (+ bias) for r in [0, rows): a warp per output feature, fp32 accumulation.
//! x [rows, in], W [out, in], bias [out] or nullptr, y [rows, out], all of `dtype`.
cudaError_t launchDenseLinear(adafuse_dtype dtype, int rows, int inFeatures, int outFeatures, void const* x,
    void const* W, void const* bias, void* y, cudaStream_t stream);

//! On the device: when *dst differs from `value` (new weight addresses), writes it and marks
//! the merged route stale (oldIds[0..topK) = -1). Graph-capturable; the value travels as a
//! kernel argument, so no host buffer has to outlive the call.
cudaError_t launchUpdateSite(
    adafuse_switch_site* dst, adafuse_switch_site value, int32_t* oldIds, int32_t topK, cudaStream_t stream);

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_SWITCH_LINEAR_KERNELS_H
