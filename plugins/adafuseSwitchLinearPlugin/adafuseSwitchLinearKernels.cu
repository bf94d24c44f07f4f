#include "adafuseSwitchLinearKernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace adafuse
{
namespace plugin
{
namespace
{
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}
__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}
__device__ __forceinline__ float toFloat(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

// One warp per output feature; lanes read 16-byte vectors of W and x when the
// rows are 16-byte aligned (the usual case), scalars otherwise.
template <typename T>
__global__ void denseLinearKernel(int rows, int inFeatures, int outFeatures, T const* __restrict__ x,
    T const* __restrict__ W, T const* __restrict__ bias, T* __restrict__ y, bool vectorized)
{
    constexpr int kVec = 16 / sizeof(T);
    int const lane = threadIdx.x & 31;
    int const o = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
    if (o >= outFeatures)
    {
        return;
    }
    T const* w = W + static_cast<size_t>(o) * inFeatures;
    for (int r = blockIdx.y; r < rows; r += gridDim.y)
    {
        T const* xr = x + static_cast<size_t>(r) * inFeatures;
        float acc = 0.F;
        if (vectorized)
        {
            int const nVec = inFeatures / kVec;
            uint4 const* w4 = reinterpret_cast<uint4 const*>(w);
            uint4 const* x4 = reinterpret_cast<uint4 const*>(xr);
            for (int v = lane; v < nVec; v += 32)
            {
                uint4 const wv = w4[v];
                uint4 const xv = x4[v];
                T const* wt = reinterpret_cast<T const*>(&wv);
                T const* xt = reinterpret_cast<T const*>(&xv);
#pragma unroll
                for (int e = 0; e < kVec; ++e)
                {
                    acc += toFloat(wt[e]) * toFloat(xt[e]);
                }
            }
        }
        else
        {
            for (int i = lane; i < inFeatures; i += 32)
            {
                acc += toFloat(w[i]) * toFloat(xr[i]);
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
        {
            acc += __shfl_xor_sync(0xffffffffu, acc, off);
        }
        if (lane == 0)
        {
            if (bias != nullptr)
            {
                acc += toFloat(bias[o]);
            }
            y[static_cast<size_t>(r) * outFeatures + o] = fromFloat<T>(acc);
        }
    }
}

__global__ void updateSiteKernel(adafuse_switch_site* dst, adafuse_switch_site value, int32_t* oldIds, int32_t topK)
{
    adafuse_switch_site const cur = *dst;
    bool const same = cur.W == value.W && cur.W_base == value.W_base && cur.A == value.A && cur.B == value.B
        && cur.out_features == value.out_features && cur.in_features == value.in_features && cur.rank == value.rank
        && cur.num_experts == value.num_experts && __float_as_int(cur.scale) == __float_as_int(value.scale);
    if (!same)
    {
        *dst = value;
        for (int32_t j = 0; j < topK; ++j)
            oldIds[j] = -1;
    }
}

template <typename T>
cudaError_t launchDense(int rows, int in, int out, void const* x, void const* W, void const* bias, void* y,
    cudaStream_t stream)
{
    dim3 block(32 * kWarpsPerBlock);
    dim3 grid((out + kWarpsPerBlock - 1) / kWarpsPerBlock, rows < 65535 ? rows : 65535);
    auto aligned16 = [](void const* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
    bool const vectorized = (static_cast<size_t>(in) * sizeof(T)) % 16 == 0 && aligned16(x) && aligned16(W);
    denseLinearKernel<T><<<grid, block, 0, stream>>>(rows, in, out, static_cast<T const*>(x),
        static_cast<T const*>(W), static_cast<T const*>(bias), static_cast<T*>(y), vectorized);
    return cudaGetLastError();
}
} // namespace

cudaError_t launchDenseLinear(adafuse_dtype dtype, int rows, int inFeatures, int outFeatures, void const* x,
    void const* W, void const* bias, void* y, cudaStream_t stream)
{
    if (rows <= 0 || inFeatures <= 0 || outFeatures <= 0)
    {
        return rows == 0 ? cudaSuccess : cudaErrorInvalidValue;
    }
    switch (dtype)
    {
    case ADAFUSE_FLOAT32: return launchDense<float>(rows, inFeatures, outFeatures, x, W, bias, y, stream);
    case ADAFUSE_FLOAT16: return launchDense<__half>(rows, inFeatures, outFeatures, x, W, bias, y, stream);
    case ADAFUSE_BFLOAT16: return launchDense<__nv_bfloat16>(rows, inFeatures, outFeatures, x, W, bias, y, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t launchUpdateSite(
    adafuse_switch_site* dst, adafuse_switch_site value, int32_t* oldIds, int32_t topK, cudaStream_t stream)
{
    updateSiteKernel<<<1, 1, 0, stream>>>(dst, value, oldIds, topK);
    return cudaGetLastError();
}

} // namespace plugin
} // namespace adafuse
