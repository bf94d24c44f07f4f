// common.cuh - shared helpers of the AdaFuse kernels (internal).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>
#include <string.h>

#include "adafuse_kernels.h"

// cudaStreamGetDevice (api.cu) appeared in CUDA 12.8; the driver floor is adafuse_check_runtime's.
#if !defined(CUDART_VERSION) || CUDART_VERSION < 12080
#error "the adafuse kernels need the CUDA toolkit 12.8 or newer (cudaStreamGetDevice)"
#endif

namespace adafuse {

// ---- host-side helpers ------------------------------------------------------

// A failed call also sets the thread's last error: consume it here (it is reported as
// ADAFUSE_ERR_CUDA), so that a later launch check does not report it a second time.
#define AF_CUDA_TRY(expr)                                  \
  do {                                                     \
    cudaError_t af_err_ = (expr);                          \
    if (af_err_ != cudaSuccess) {                          \
      (void)cudaGetLastError();                            \
      return ADAFUSE_ERR_CUDA;                             \
    }                                                      \
  } while (0)

// After a launch: report a launch failure (bad config, no kernel image, ...).
#define AF_LAUNCH_CHECK()                                  \
  do {                                                     \
    cudaError_t af_err_ = cudaGetLastError();              \
    if (af_err_ != cudaSuccess) return ADAFUSE_ERR_CUDA;   \
  } while (0)

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
__host__ __device__ inline bool aligned8(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 7u) == 0; }

inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

inline int elem_size(adafuse_dtype dt) {
  switch (dt) {
    case ADAFUSE_FLOAT32: return 4;
    case ADAFUSE_FLOAT16: return 2;
    case ADAFUSE_BFLOAT16: return 2;
  }
  return 0;
}

inline bool valid_dtype(int dt) {
  return dt == ADAFUSE_FLOAT32 || dt == ADAFUSE_FLOAT16 || dt == ADAFUSE_BFLOAT16;
}

// Properties of the stream's device, looked up once per device (thread-safe
// enough: the values are idempotent and int-sized).
constexpr int kMaxDevices = 64;
struct DeviceInfo {
  int device;
  int sm_count;
  int cc_major;
  int max_smem_optin;
  int smem_per_sm;
  int reserved_smem_per_block;
};
int stream_device(cudaStream_t stream, int* dev);           // returns adafuse_status
int device_info(cudaStream_t stream, DeviceInfo* out);      // returns adafuse_status

// ---- device-side helpers ----------------------------------------------------

template <typename T> struct TypeOps;
template <> struct TypeOps<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  static constexpr int kVec = 4;  // elements per 16-byte vector
};
template <> struct TypeOps<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static constexpr int kVec = 8;
};
template <> struct TypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static constexpr int kVec = 8;
};

template <typename T>
__device__ __forceinline__ float ldf(const T* p) {
  return TypeOps<T>::to_f(*p);
}

// Unpack a 16-byte vector of T into floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v, float* f);
template <>
__device__ __forceinline__ void unpack16<float>(const uint4& v, float* f) {
  f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
  f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
}
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
    float2 ff = __half22float2(h);
    f[2 * i] = ff.x;
    f[2 * i + 1] = ff.y;
  }
}

// Pack floats into a 16-byte vector of T (round to nearest even).
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* f);
template <>
__device__ __forceinline__ uint4 pack16<float>(const float* f) {
  return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                    __float_as_uint(f[3]));
}
template <>
__device__ __forceinline__ uint4 pack16<__nv_bfloat16>(const float* f) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    w[i] = *reinterpret_cast<uint32_t*>(&h);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}
template <>
__device__ __forceinline__ uint4 pack16<__half>(const float* f) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    w[i] = *reinterpret_cast<uint32_t*>(&h);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---- FP8 (e4m3) base weights ------------------------------------------------------
// Two e4m3 values (the low byte first) to a half2, exactly (fp16 holds every e4m3 value). sm_89+:
// one cvt; older architectures: place the 7 exponent-mantissa bits in fp16's field (e4m3's
// bias is 7, fp16's 15) and multiply by 2^8, exact for normals and denormals alike (no NaN:
// the quantizer writes none).
__device__ __forceinline__ __half2 fp8x2_to_half2(uint16_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3);
  return __half2(r);
#else
  const uint32_t w = (static_cast<uint32_t>(v & 0xff00u) << 8) | (v & 0x00ffu);  // byte i -> bits 16i..16i+7
  const uint32_t bits = ((w & 0x007f007fu) << 7) | ((w & 0x00800080u) << 8);
  __half2 h;
  memcpy(&h, &bits, sizeof(h));
  return __hmul2(h, __floats2half2_rn(256.f, 256.f));
#endif
}

// 8 e4m3 values (8 bytes, the low byte first) to floats, exactly.
__device__ __forceinline__ void unpack8_fp8(const uint2& v, float* f) {
  const uint32_t w[2] = {v.x, v.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 lo = __half22float2(fp8x2_to_half2(static_cast<uint16_t>(w[i] & 0xffffu)));
    const float2 hi = __half22float2(fp8x2_to_half2(static_cast<uint16_t>(w[i] >> 16)));
    f[4 * i] = lo.x; f[4 * i + 1] = lo.y; f[4 * i + 2] = hi.x; f[4 * i + 3] = hi.y;
  }
}

// 16 e4m3 values to floats.
__device__ __forceinline__ void unpack16_fp8(const uint4& v, float* f) {
  unpack8_fp8(make_uint2(v.x, v.y), f);
  unpack8_fp8(make_uint2(v.z, v.w), f + 8);
}

// Two e4m3 values (as fp16, exact) in T's 32-bit pair; bf16 holds every e4m3 value too.
template <typename T>
__device__ __forceinline__ uint32_t half2_as_pair(__half2 h);
template <>
__device__ __forceinline__ uint32_t half2_as_pair<__half>(__half2 h) {
  uint32_t o;
  memcpy(&o, &h, 4);
  return o;
}
template <>
__device__ __forceinline__ uint32_t half2_as_pair<__nv_bfloat16>(__half2 h) {
  const __nv_bfloat162 b = __float22bfloat162_rn(__half22float2(h));
  uint32_t o;
  memcpy(&o, &b, 4);
  return o;
}

// 8 e4m3 values (8 bytes) to 8 values of T in a 16-byte vector, exactly.
template <typename T>
__device__ __forceinline__ uint4 fp8x8_to16(uint2 v) {
  const uint32_t w[2] = {v.x, v.y};
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    o[2 * i] = half2_as_pair<T>(fp8x2_to_half2(static_cast<uint16_t>(w[i] & 0xffffu)));
    o[2 * i + 1] = half2_as_pair<T>(fp8x2_to_half2(static_cast<uint16_t>(w[i] >> 16)));
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// A base weight W stored as WT: T itself, or __nv_fp8_e4m3 (whose per-output-channel scale the
// kernel applies to the finished W x dot). kElems elements per 16-byte load.
template <typename T, typename WT>
struct WeightOps {
  static constexpr int kElems = TypeOps<T>::kVec;
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) { unpack16<T>(v, f); }
};
template <typename T>
struct WeightOps<T, __nv_fp8_e4m3> {
  static constexpr int kElems = 16;
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) { unpack16_fp8(v, f); }
};
template <typename WT>
constexpr bool kIsFp8 = sizeof(WT) == 1;

// Streaming 16-byte load that does not allocate in L1 (weights are read once).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 ld_stream8(const void* p) {
  uint2 r;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}
__device__ __forceinline__ uint4 ld_cg16(const void* p) {
  uint4 r;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Programmatic dependent launch (sm_90+): no-ops elsewhere and when the
// launch did not ask for it.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// gpu-scope release store / acquire load of a flag (the shrink tells the GEMV that x is ready).
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A launch's programmatic dependent launch (PDL) request: allowed by the caller (its options and
// a device of sm_90+) on `device`. launch_ex grants it only to a kernel whose code on that device
// was compiled for sm_90+: pdl_wait is empty in code compiled for older architectures (e.g. an
// sm_80 build JIT-compiled from PTX on a Hopper GPU), and such a kernel launched early would
// read its inputs before the previous kernel has written them.
struct Pdl {
  bool allowed;
  int device;
  Pdl when(bool cond) const { return Pdl{allowed && cond, device}; }
};
constexpr Pdl kNoPdl{false, -1};
inline Pdl pdl_request(const DeviceInfo& di, bool allowed) { return Pdl{allowed && di.cc_major >= 9, di.device}; }
// PDL of launches on this stream with the library's default (on where the device allows it).
int stream_pdl(cudaStream_t stream, Pdl* out);  // returns adafuse_status
// Whether kern's code on `device` was compiled for sm_90+ (cudaFuncGetAttributes' ptxVersion),
// looked up once per (kernel, device).
int kernel_has_pdl(const void* kern, int device, bool* out);  // returns adafuse_status

// Launch, as a programmatic dependent when pdl allows it (see Pdl). A kernel launched so runs
// while the previous launch finishes: it must wait (pdl_wait) before it reads anything an
// earlier kernel writes and write nothing before that; what it does before (its own
// pdl_launch_dependents, setup) overlaps the previous kernel's tail.
template <typename... KArgs, typename... Args>
int launch_ex(void (*kern)(KArgs...), dim3 grid, int threads, size_t smem, Pdl pdl, cudaStream_t stream,
              Args... args) {
  bool early = false;
  if (pdl.allowed) {
    const int st = kernel_has_pdl(reinterpret_cast<const void*>(kern), pdl.device, &early);
    if (st != ADAFUSE_OK) return st;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = early ? 1 : 0;
  AF_CUDA_TRY(cudaLaunchKernelEx(&cfg, kern, args...));
  return ADAFUSE_OK;
}

// ---- tensor-core helpers (sm_80+) -------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_ptr)));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;  // 0: fill with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 8 : 0;  // 0: fill with zeros
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

}  // namespace adafuse
