// Per-token lookup of the routing table on the device (what the pre-gate computes, as a table).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace adafuse {

// out_ids/out_gates [n, k] = table_ids/table_gates [ids[i], :]; ids are already checked in range.
cudaError_t gather_routes(const int64_t* ids, int64_t n, int32_t k, const int32_t* table_ids, const float* table_gates,
                          int32_t* out_ids, float* out_gates, cudaStream_t stream);

}  // namespace adafuse
