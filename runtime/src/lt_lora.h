// One projection with its routed LoRA term in cuBLASLt GEMMs: what the native backend runs at more than
// kNativeFewRows rows with 16-bit weights (native_step.cpp), and what tools/lt_site_for_tests.cpp exposes to the
// GPU tests. Rounded as the kernel library's many-rows path rounds z (lora_linear.cu), one rounding more on y:
//   y = dtype(x W^T + bias)                  (the bias epilogue)
//   t = x A_all^T in float32                 (A_all = A [E, rank, in] as [E * rank, in])
//   z = dtype(c * t)                         (c[n, e]: row n's gates of expert e summed; lora_route_columns)
//   y = dtype(y + z B_cat^T)                 (B_cat [out, E * rank]: lora_concat_b of B [E, out, rank])
// reference/model.py also rounds x W^T before it adds the LoRA term.
#pragma once

#include <cstdint>
#include <string>

#include "cublaslt.h"

namespace adafuse {

struct LtLoraCall {
  int dtype = 2;  // adafuse_dtype: 1 float16, 2 bfloat16
  int64_t rows = 0, in = 0, out = 0;
  const void* x = nullptr;     // [rows, in]
  const void* W = nullptr;     // [out, in]
  const void* bias = nullptr;  // [out] or null
  // The adapter (A null: none, y = x W^T + bias alone)
  const void* A = nullptr;      // [E, rank, in]
  const void* b_cat = nullptr;  // [out, E * rank]
  int64_t experts = 0, rank = 0, top_k = 0;
  const int32_t* ids = nullptr;  // [rows, top_k]: an id outside [0, E) adds nothing
  const float* gates = nullptr;  // [rows, top_k]
  float* t = nullptr;            // scratch [rows, E * rank] float32
  void* z = nullptr;             // scratch [rows, E * rank], the dtype
  void* y = nullptr;             // [rows, out]
};

// Enqueues the call on `stream`. false: cuBLASLt has no algorithm for one of its GEMMs (y is then incomplete:
// the caller computes it another way). Throws Error(ADAFUSE_ERR_CUDA) naming `what` when a call fails.
bool lt_lora_linear(LtGemms& gemms, const LtLoraCall& c, cudaStream_t stream, const std::string& what);

}  // namespace adafuse
