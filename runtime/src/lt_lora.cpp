#include "lt_lora.h"

#include "error.h"
#include "native_mix.h"

namespace adafuse {

bool lt_lora_linear(LtGemms& gemms, const LtLoraCall& c, cudaStream_t stream, const std::string& what) {
  if (c.dtype != 1 && c.dtype != 2) fail(ADAFUSE_ERR_INTERNAL, what + ": cuBLASLt runs float16 and bfloat16 only");
  const cudaDataType_t type = c.dtype == 1 ? CUDA_R_16F : CUDA_R_16BF;
  LtGemm base;
  base.in_type = base.out_type = type;
  base.m = c.out;
  base.n = c.rows;
  base.k = c.in;
  base.X = c.x;
  base.W = c.W;
  base.D = c.y;
  if (c.bias != nullptr) {
    // y = round(x W^T + bias) with one rounding, as the reference and the kernel library compute it: the bias goes
    // in as C (beta 1). The bias epilogue rounded x W^T to the dtype before adding the bias for some shapes on an
    // H100 (odd widths, misaligned rows: a 1-ulp error where x W^T nearly cancels the bias).
    const cudaError_t status = broadcast_row(c.dtype, c.rows, c.out, c.bias, c.y, stream);
    if (status != cudaSuccess) fail(ADAFUSE_ERR_CUDA, what + ": bias broadcast: " + cudaGetErrorString(status));
    base.accumulate = true;
  }
  if (c.A == nullptr) return gemms.run(base, stream, what);

  const int64_t width = c.experts * c.rank;
  LtGemm shrink;
  shrink.in_type = type;
  shrink.out_type = CUDA_R_32F;
  shrink.m = width;
  shrink.n = c.rows;
  shrink.k = c.in;
  shrink.X = c.x;
  shrink.W = c.A;
  shrink.D = c.t;
  LtGemm expand;
  expand.in_type = expand.out_type = type;
  expand.m = c.out;
  expand.n = c.rows;
  expand.k = width;
  expand.X = c.z;
  expand.W = c.b_cat;
  expand.D = c.y;
  expand.accumulate = true;
  if (!gemms.run(shrink, stream, what + " x A^T")) return false;
  const cudaError_t status = lora_route_columns(c.dtype, c.rows, static_cast<int32_t>(c.experts), static_cast<int32_t>(c.rank),
                                                c.t, c.ids, c.gates, static_cast<int32_t>(c.top_k), c.z, stream);
  if (status != cudaSuccess) fail(ADAFUSE_ERR_CUDA, what + ": LoRA routing columns: " + cudaGetErrorString(status));
  return gemms.run(base, stream, what + " x W^T") && gemms.run(expand, stream, what + " z B_cat^T");
}

}  // namespace adafuse
