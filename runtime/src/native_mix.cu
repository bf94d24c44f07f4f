#include "native_mix.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace adafuse {
namespace {

__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ inline T from_float(float v);
template <>
__device__ inline float from_float<float>(float v) { return v; }
template <>
__device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ inline float round_to(float v) { return to_float(from_float<T>(v)); }

template <typename T>
__global__ void mix_experts_kernel(int64_t rows, int32_t k, int64_t hidden, const T* expert, const float* gates, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * hidden) return;
  const int64_t n = i / hidden, c = i % hidden;
  float acc = 0.0f;
  for (int32_t j = 0; j < k; ++j) {
    const float gate = round_to<T>(gates[n * k + j]);
    const float term = round_to<T>(gate * to_float(expert[(n * k + j) * hidden + c]));
    acc = j == 0 ? term : round_to<T>(acc + term);  // `0 + t` is t itself; later sums round
  }
  out[i] = from_float<T>(acc);
}

template <typename T>
cudaError_t launch(int64_t rows, int32_t k, int64_t hidden, const void* expert, const float* gates, void* out,
                   cudaStream_t stream) {
  const int64_t total = rows * hidden;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
  mix_experts_kernel<T><<<blocks, threads, 0, stream>>>(rows, k, hidden, static_cast<const T*>(expert), gates,
                                                        static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
__global__ void route_columns_kernel(int64_t rows, int32_t experts, int32_t rank, const float* t, const int32_t* ids,
                                     const float* gates, int32_t top_k, T* z) {
  const int64_t width = int64_t{experts} * rank;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * width) return;
  const int64_t n = i / width;
  const int32_t e = static_cast<int32_t>(i % width / rank);
  float c = 0.0f;
  for (int32_t j = 0; j < top_k; ++j)
    if (ids[n * top_k + j] == e) c += gates[n * top_k + j];
  z[i] = from_float<T>(c != 0.0f ? c * t[i] : 0.0f);  // an expert the row does not use adds nothing
}

template <typename T>
__global__ void concat_b_kernel(int32_t experts, int64_t out, int32_t rank, const T* B, T* b_cat) {
  const int64_t width = int64_t{experts} * rank;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= out * width) return;
  const int64_t o = i / width, e = i % width / rank, j = i % rank;
  b_cat[i] = B[(e * out + o) * rank + j];
}

unsigned blocks_for(int64_t total, int threads) { return static_cast<unsigned>((total + threads - 1) / threads); }

template <typename T>
cudaError_t launch_route_columns(int64_t rows, int32_t experts, int32_t rank, const float* t, const int32_t* ids,
                                 const float* gates, int32_t top_k, void* z, cudaStream_t stream) {
  const int64_t total = rows * experts * rank;
  if (total == 0) return cudaSuccess;
  route_columns_kernel<T><<<blocks_for(total, 256), 256, 0, stream>>>(rows, experts, rank, t, ids, gates, top_k,
                                                                        static_cast<T*>(z));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_concat_b(int32_t experts, int64_t out, int32_t rank, const void* B, void* b_cat, cudaStream_t stream) {
  const int64_t total = out * experts * rank;
  if (total == 0) return cudaSuccess;
  concat_b_kernel<T><<<blocks_for(total, 256), 256, 0, stream>>>(experts, out, rank, static_cast<const T*>(B),
                                                                   static_cast<T*>(b_cat));
  return cudaGetLastError();
}

}  // namespace

cudaError_t lora_route_columns(int dtype, int64_t rows, int32_t experts, int32_t rank, const float* t, const int32_t* ids,
                               const float* gates, int32_t top_k, void* z, cudaStream_t stream) {
  switch (dtype) {
    case 1: return launch_route_columns<__half>(rows, experts, rank, t, ids, gates, top_k, z, stream);
    case 2: return launch_route_columns<__nv_bfloat16>(rows, experts, rank, t, ids, gates, top_k, z, stream);
    default: return cudaErrorInvalidValue;  // cuBLASLt runs the 16-bit dtypes only
  }
}

cudaError_t lora_concat_b(int dtype, int32_t experts, int64_t out, int32_t rank, const void* B, void* b_cat,
                          cudaStream_t stream) {
  switch (dtype) {
    case 1: return launch_concat_b<__half>(experts, out, rank, B, b_cat, stream);
    case 2: return launch_concat_b<__nv_bfloat16>(experts, out, rank, B, b_cat, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t mix_experts(int dtype, int64_t rows, int32_t k, int64_t hidden, const void* expert, const float* gates, void* out,
                        cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch<float>(rows, k, hidden, expert, gates, out, stream);
    case 1: return launch<__half>(rows, k, hidden, expert, gates, out, stream);
    case 2: return launch<__nv_bfloat16>(rows, k, hidden, expert, gates, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace adafuse
