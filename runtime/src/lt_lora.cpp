#include "lt_lora.h"

#include "error.h"
#include "native_mix.h"

namespace adafuse {
namespace {
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
}  // namespace

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
  base.bias = c.bias;
  base.D = c.y;
  // y = round(x W^T + bias) must be rounded once, as the reference and the kernel library compute it. On an H100
  // the bias epilogue did so for 16-byte-aligned operands and widths (every native artifact's sites); for odd
  // widths or misaligned rows cuBLASLt's kernels rounded x W^T before adding the bias (1 ulp off where the two
  // nearly cancel), and so did a bias given as C with beta 1. Those sites run the kernel library instead.
  if (c.bias != nullptr && !(aligned16(c.x) && aligned16(c.W) && aligned16(c.bias) && aligned16(c.y) && c.in % 8 == 0 &&
                             c.out % 8 == 0))
    return false;
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
