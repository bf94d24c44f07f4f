#include "route_gather.h"

namespace adafuse {
namespace {

__global__ void gather_routes_kernel(const int64_t* ids, int64_t n, int32_t k, const int32_t* table_ids,
                                     const float* table_gates, int32_t* out_ids, float* out_gates) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * k) return;
  const int64_t row = ids[i / k] * k + i % k;
  out_ids[i] = table_ids[row];
  out_gates[i] = table_gates[row];
}

}  // namespace

cudaError_t gather_routes(const int64_t* ids, int64_t n, int32_t k, const int32_t* table_ids, const float* table_gates,
                          int32_t* out_ids, float* out_gates, cudaStream_t stream) {
  const int64_t total = n * k;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
  gather_routes_kernel<<<blocks, threads, 0, stream>>>(ids, n, k, table_ids, table_gates, out_ids, out_gates);
  return cudaGetLastError();
}

}  // namespace adafuse
