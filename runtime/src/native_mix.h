// MixLoRA's combination of a token's FFN experts on the device (the one step of the native backend that
// the kernel library has no operation for): out[n] = sum_j dtype(dtype(gates[n, j]) * expert[n * k + j]),
// summed left to right with each partial sum rounded to the dtype, as reference/model.py _mlp computes
// `out + gates[:, j].to(x.dtype) * down` in the model dtype.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace adafuse {

// dtype: 0 float32, 1 float16, 2 bfloat16 (adafuse_dtype). expert [rows * k, hidden], gates [rows, k]
// float32, out [rows, hidden]; all device pointers, contiguous.
cudaError_t mix_experts(int dtype, int64_t rows, int32_t k, int64_t hidden, const void* expert, const float* gates, void* out,
                        cudaStream_t stream);

}  // namespace adafuse
