// The native backend's own small kernels, for steps the kernel library has no operation for.
// MixLoRA's combination of a token's FFN experts: out[n] = sum_j dtype(dtype(gates[n, j]) * expert[n * k + j]),
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

// The routed LoRA's middle step when the native backend runs a site's GEMMs through cuBLASLt (native_step.cpp):
//   z[n, e*rank + j] = dtype(c[n, e] * t[n, e*rank + j]),  c[n, e] = sum of gates[n, i] over i with ids[n, i] == e,
// t = x A_all^T in float32 [rows, experts * rank], z [rows, experts * rank] in the model dtype: the kernel
// library's many-rows zscale (lora_linear.cu) with scale 1, so both paths round z alike.
cudaError_t lora_route_columns(int dtype, int64_t rows, int32_t experts, int32_t rank, const float* t, const int32_t* ids,
                               const float* gates, int32_t top_k, void* z, cudaStream_t stream);

// B_cat [out, experts * rank] (B_cat[o, e*rank + j] = B[e, o, j]) from B [experts, out, rank]: the LoRA up
// projection as one GEMM operand, made once at open.
cudaError_t lora_concat_b(int dtype, int32_t experts, int64_t out, int32_t rank, const void* B, void* b_cat,
                          cudaStream_t stream);

}  // namespace adafuse
