// decode_ops.cu - the elementwise and attention work of a decode step between the projections,
// each fused into one launch (a step of a 32-layer model otherwise replays ~1,300 small
// PyTorch kernels, about a third of its time on an H200):
//   add_rms_norm      h += delta; out = w * rmsnorm(h)           (one block per row)
//   rope_kv_write     q' = rope(q); cache[pos] = rope(k), v      (one thread per element pair)
//   silu_mul          out = silu(g) * u                          (one thread per element)
//   decode_attention  split-K (flash-decoding) GQA attention of one query token per row over
//                     the static KV cache: partial softmax per key chunk, then a combine.
// Every intermediate is rounded to the storage dtype where the PyTorch ops it replaces round
// (runners/torch_cuda.py TorchOps), so the kernels compute the same function.
#include "common.cuh"

#include <math.h>

namespace adafuse {
namespace {

constexpr int kNormThreads = 256;
constexpr int kAttnThreads = 128;
constexpr int kAttnMaxGroup = ADAFUSE_ATTN_MAX_GROUP;  // query heads per KV head

template <typename T>
__device__ __forceinline__ T rnd(float v) {
  return TypeOps<T>::from_f(v);
}
template <typename T>
__device__ __forceinline__ float rt(float v) {  // round to T and back
  return TypeOps<T>::to_f(TypeOps<T>::from_f(v));
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += red[w];
  __syncthreads();
  return s;
}

// ---- add + RMSNorm ----------------------------------------------------------
// h_new = T(h + delta) (a separate add rounds there); out = T(w * T(h_new * rsqrt(mean(h_new^2) + eps))).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kNormThreads)
add_rms_norm_kernel(int hidden, T* __restrict__ h, const T* __restrict__ delta, const T* __restrict__ w,
                    float eps, T* __restrict__ out) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  __shared__ float red[kNormThreads / 32];
  const size_t row = blockIdx.x;
  T* hr = h + row * hidden;
  const T* dr = delta ? delta + row * hidden : nullptr;
  T* orow = out + row * hidden;
  float ss = 0.f;
  if (VEC) {
    constexpr int V = TypeOps<T>::kVec;
    for (int v = threadIdx.x; v < hidden / V; v += kNormThreads) {
      float a[V];
      unpack16<T>(reinterpret_cast<const uint4*>(hr)[v], a);
      if (dr) {
        float d[V];
        unpack16<T>(reinterpret_cast<const uint4*>(dr)[v], d);
#pragma unroll
        for (int i = 0; i < V; ++i) a[i] = rt<T>(a[i] + d[i]);
        reinterpret_cast<uint4*>(hr)[v] = pack16<T>(a);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) ss = fmaf(a[i], a[i], ss);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += kNormThreads) {
      float a = ldf(hr + i);
      if (dr) {
        a = rt<T>(a + ldf(dr + i));
        hr[i] = rnd<T>(a);
      }
      ss = fmaf(a, a, ss);
    }
  }
  const float inv = rsqrtf(block_sum(ss, red) / hidden + eps);
  // second pass re-reads this thread's own elements of h (just written by it)
  if (VEC) {
    constexpr int V = TypeOps<T>::kVec;
    for (int v = threadIdx.x; v < hidden / V; v += kNormThreads) {
      float a[V], ww[V];
      unpack16<T>(reinterpret_cast<const uint4*>(hr)[v], a);
      unpack16<T>(reinterpret_cast<const uint4*>(w)[v], ww);
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = ww[i] * rt<T>(a[i] * inv);
      reinterpret_cast<uint4*>(orow)[v] = pack16<T>(a);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += kNormThreads) orow[i] = rnd<T>(ldf(w + i) * rt<T>(ldf(hr + i) * inv));
  }
}

// ---- RoPE + KV-cache write ----------------------------------------------------
// Token n = b * seq + s at position p = positions[n]. One thread per (n, head, i < D/2) pair of
// q heads, then k heads (which also write v). rope(x)[i] = T(T(x_i c_i) + T(-x_{i+D/2} s_i)),
// rope(x)[i+D/2] = T(T(x_{i+D/2} c_{i+D/2}) + T(x_i s_{i+D/2})): q*cos + rotate_half(q)*sin.
template <typename T>
__global__ void rope_kv_kernel(int tokens, int seq, int H, int KV, int D, const T* __restrict__ q, long long ldq,
                               const T* __restrict__ k, long long ldk, const T* __restrict__ v, long long ldv,
                               const T* __restrict__ cos, const T* __restrict__ sin,
                               const int64_t* __restrict__ positions, T* __restrict__ q_out,
                               T* __restrict__ k_cache, T* __restrict__ v_cache, int max_seq) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  const int half = D / 2;
  const long long per_token = static_cast<long long>(H + KV) * half;
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= per_token * tokens) return;
  const int n = static_cast<int>(idx / per_token);
  const int rem = static_cast<int>(idx % per_token);
  const int head = rem / half, i = rem % half;
  const T* cr = cos + static_cast<size_t>(n) * D;
  const T* sr = sin + static_cast<size_t>(n) * D;
  const float c0 = ldf(cr + i), c1 = ldf(cr + i + half), s0 = ldf(sr + i), s1 = ldf(sr + i + half);
  if (head < H) {
    const T* x = q + n * ldq + static_cast<size_t>(head) * D;
    const float x0 = ldf(x + i), x1 = ldf(x + i + half);
    T* o = q_out + (static_cast<size_t>(n) * H + head) * D;
    o[i] = rnd<T>(rt<T>(x0 * c0) + rt<T>(-x1 * s0));
    o[i + half] = rnd<T>(rt<T>(x1 * c1) + rt<T>(x0 * s1));
    return;
  }
  const int kh = head - H;
  const long long p = positions[n];
  if (p < 0 || p >= max_seq) return;  // out of the cache: nothing written (the caller checks)
  const int b = n / seq;
  const size_t dst = ((static_cast<size_t>(b) * KV + kh) * max_seq + p) * D;
  const T* x = k + n * ldk + static_cast<size_t>(kh) * D;
  const float x0 = ldf(x + i), x1 = ldf(x + i + half);
  k_cache[dst + i] = rnd<T>(rt<T>(x0 * c0) + rt<T>(-x1 * s0));
  k_cache[dst + i + half] = rnd<T>(rt<T>(x1 * c1) + rt<T>(x0 * s1));
  const T* vr = v + n * ldv + static_cast<size_t>(kh) * D;
  v_cache[dst + i] = vr[i];
  v_cache[dst + i + half] = vr[i + half];
}

// ---- SiLU * up ----------------------------------------------------------------
// out = T(T(silu(g)) * u), silu(g) = g / (1 + exp(-g)) in float.
template <typename T>
__global__ void silu_mul_kernel(int rows, int inter, const T* __restrict__ g, const T* __restrict__ u, long long ld,
                                T* __restrict__ out) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long long>(rows) * inter) return;
  const long long n = idx / inter, i = idx % inter;
  const float gv = ldf(g + n * ld + i);
  out[idx] = rnd<T>(rt<T>(gv / (1.f + expf(-gv))) * ldf(u + n * ld + i));
}

// ---- decode attention (split-K) -------------------------------------------------
// Block (b, kv head, split) takes keys [split*C, split*C + C) ∩ allowed for the G query heads
// of that KV head, C = kAttnU * kAttnThreads / L. L = D/V lanes hold one key's 16-byte vectors.
// Every thread issues all its K and V loads (kAttnU of each) before the first use, so a block
// waits for memory about once instead of once per key batch. Writes the unnormalised partial
// output acc[D], the chunk max m and sum l per query head.
constexpr int kAttnU = 8;

template <typename T, int L>
__global__ void __launch_bounds__(kAttnThreads)
attn_partial_kernel(int H, int KV, int max_seq, int nsplit, const T* __restrict__ q,
                    const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                    const int64_t* __restrict__ positions, int window, float scale,
                    float* __restrict__ part) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  constexpr int V = TypeOps<T>::kVec, D = L * V, KG = kAttnThreads / L;  // KG keys per pass
  constexpr int C = kAttnU * KG;
  extern __shared__ float smem[];
  const int G = H / KV;
  float* qs = smem;                        // [G][D]
  float* ps = qs + G * D;                  // [G][C] scores, then probabilities
  float* red = ps + G * C;                 // [KG][G][D]
  const int split = blockIdx.x % nsplit;
  const int kh = (blockIdx.x / nsplit) % KV;
  const int b = blockIdx.x / (nsplit * KV);
  const long long pos = positions[b];
  long long lo = static_cast<long long>(split) * C, hi = lo + C;  // [lo, hi)
  if (hi > pos + 1) hi = pos + 1;
  if (window > 0 && lo < pos - window + 1) lo = pos - window + 1;
  if (hi > max_seq) hi = max_seq;
  const int cnt = hi > lo ? static_cast<int>(hi - lo) : 0;
  const size_t row0 = static_cast<size_t>(b) * H + static_cast<size_t>(kh) * G;  // first query head
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (cnt == 0) {  // nothing allowed in this chunk: an empty partial
    for (int x = tid; x < G * (D + 2); x += kAttnThreads) {
      const int g = x / (D + 2), d = x % (D + 2);
      part[((row0 + g) * nsplit + split) * (D + 2) + d] = d == D ? -INFINITY : 0.f;
    }
    return;
  }
  // thread (kg, li): keys kg + KG * u, dims [li*V, li*V + V); warp-contiguous keys per pass
  const int kg = tid / L, li = tid % L;
  const T* kbase = k_cache + ((static_cast<size_t>(b) * KV + kh) * max_seq + lo) * D + li * V;
  const T* vbase = v_cache + ((static_cast<size_t>(b) * KV + kh) * max_seq + lo) * D + li * V;
  uint4 kr[kAttnU], vr[kAttnU];
#pragma unroll
  for (int u = 0; u < kAttnU; ++u) {
    const int j = kg + KG * u;
    if (j < cnt) {
      kr[u] = ld_cg16(kbase + static_cast<size_t>(j) * D);
      vr[u] = ld_cg16(vbase + static_cast<size_t>(j) * D);
    }
  }
  for (int x = tid; x < G * D; x += kAttnThreads) qs[x] = ldf(q + row0 * D + x) * scale;
  __syncthreads();
#pragma unroll
  for (int u = 0; u < kAttnU; ++u) {
    const int j = kg + KG * u;  // uniform across the L lanes of one key (L divides 32)
    float kf[V];
    if (j < cnt) unpack16<T>(kr[u], kf);
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
      if (j < cnt) {
#pragma unroll
        for (int i = 0; i < V; ++i) s = fmaf(qs[g * D + li * V + i], kf[i], s);
      }
#pragma unroll
      for (int o = L / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (j < cnt && li == 0) ps[g * C + j] = s;
    }
  }
  __syncthreads();
  // per head: max and exp over the chunk (warp w handles heads w, w+4, ...)
  for (int g = warp; g < G; g += kAttnThreads / 32) {
    float m = -INFINITY;
    for (int j = lane; j < cnt; j += 32) m = fmaxf(m, ps[g * C + j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int j = lane; j < cnt; j += 32) {
      const float e = expf(ps[g * C + j] - m);
      ps[g * C + j] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      float* pr = part + ((row0 + g) * nsplit + split) * (D + 2);
      pr[D] = m;
      pr[D + 1] = l;
    }
  }
  __syncthreads();
  // P V over this thread's keys (V already in registers), then a reduction over the KG key slots
  float acc[kAttnMaxGroup][V];
#pragma unroll
  for (int g = 0; g < kAttnMaxGroup; ++g)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[g][i] = 0.f;
#pragma unroll
  for (int u = 0; u < kAttnU; ++u) {
    const int j = kg + KG * u;
    if (j < cnt) {
      float vf[V];
      unpack16<T>(vr[u], vf);
#pragma unroll
      for (int g = 0; g < kAttnMaxGroup; ++g) {
        if (g < G) {
          const float p = ps[g * C + j];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kAttnMaxGroup; ++g)
    if (g < G)
#pragma unroll
      for (int i = 0; i < V; ++i) red[(kg * G + g) * D + li * V + i] = acc[g][i];
  __syncthreads();
  for (int x = tid; x < G * D; x += kAttnThreads) {
    const int g = x / D, d = x % D;
    float s = 0.f;
    for (int w = 0; w < KG; ++w) s += red[(w * G + g) * D + d];
    part[((row0 + g) * nsplit + split) * (D + 2) + d] = s;
  }
}

// One block per (b, query head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s. The
// block's threads split the splits for M and the weights, then (dim, split group) pairs for the
// weighted sum, so no thread walks all splits serially (long contexts have hundreds).
constexpr int kCombineThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
attn_combine_kernel(int D, int nsplit, const float* __restrict__ part, T* __restrict__ out) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  extern __shared__ float wsm[];  // [nsplit] weights e^(m_s - M), then [groups][D] partial sums
  __shared__ float red[kCombineThreads / 32];
  const size_t row = blockIdx.x;
  const float* pr = part + row * nsplit * (D + 2);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float M = -INFINITY;
  for (int s = tid; s < nsplit; s += kCombineThreads) M = fmaxf(M, pr[s * (D + 2) + D]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  if (lane == 0) red[warp] = M;
  __syncthreads();
  M = red[0];
  for (int w = 1; w < kCombineThreads / 32; ++w) M = fmaxf(M, red[w]);
  __syncthreads();
  float den = 0.f;
  for (int s = tid; s < nsplit; s += kCombineThreads) {
    const float m = pr[s * (D + 2) + D];
    const float wgt = m == -INFINITY ? 0.f : expf(m - M);
    wsm[s] = wgt;
    den = fmaf(wgt, pr[s * (D + 2) + D + 1], den);
  }
  den = block_sum(den, red);  // its barriers also publish wsm
  const int groups = kCombineThreads / D > 0 ? kCombineThreads / D : 1;
  float* acc = wsm + nsplit;  // [groups][D]
  const int sg = tid / D;
  if (sg < groups) {
    for (int d = tid % D; d < D; d += kCombineThreads) {
      float num = 0.f;
#pragma unroll 4
      for (int s = sg; s < nsplit; s += groups) num = fmaf(wsm[s], pr[s * (D + 2) + d], num);
      acc[sg * D + d] = num;
    }
  }
  __syncthreads();
  for (int d = tid; d < D; d += kCombineThreads) {
    float num = 0.f;
    for (int g = 0; g < groups; ++g) num += acc[g * D + d];
    out[row * D + d] = rnd<T>(num / den);
  }
}

// ---- host side -------------------------------------------------------------------
bool vec_ok(int n, int V, const void* a, const void* b, const void* c, const void* d) {
  return n % V == 0 && aligned16(a) && (!b || aligned16(b)) && aligned16(c) && aligned16(d);
}

template <typename T>
int launch_norm(int rows, int hidden, void* h, const void* delta, const void* w, float eps, void* out,
                cudaStream_t stream) {
  const bool vec = vec_ok(hidden, TypeOps<T>::kVec, h, delta, w, out);
  auto* ht = static_cast<T*>(h);
  auto* dt = static_cast<const T*>(delta);
  auto* wt = static_cast<const T*>(w);
  auto* ot = static_cast<T*>(out);
  Pdl pdl;
  const int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  if (vec)
    return launch_ex(add_rms_norm_kernel<T, true>, dim3(rows), kNormThreads, 0, pdl, stream, hidden, ht, dt, wt, eps,
                     ot);
  else
    return launch_ex(add_rms_norm_kernel<T, false>, dim3(rows), kNormThreads, 0, pdl, stream, hidden, ht, dt, wt, eps,
                     ot);
}

// Keys per split: kAttnU * kAttnThreads / L with L = D * element size / 16.
int attn_chunk(int head_dim, int esize) { return kAttnU * kAttnThreads * 16 / (head_dim * esize); }
int attn_nsplit(int max_seq, int head_dim, int esize) {
  const int c = attn_chunk(head_dim, esize);
  return (max_seq + c - 1) / c;
}

template <typename T, int L>
int launch_attn_partial(int batch, int H, int KV, int max_seq, const void* q, const void* kc, const void* vc,
                        const int64_t* positions, int window, float scale, float* part, cudaStream_t stream) {
  constexpr int D = L * TypeOps<T>::kVec, C = kAttnU * kAttnThreads / L;
  const int G = H / KV, nsplit = attn_nsplit(max_seq, D, static_cast<int>(sizeof(T)));
  const size_t smem = sizeof(float) * (static_cast<size_t>(G) * D + static_cast<size_t>(G) * C +
                                       static_cast<size_t>(kAttnThreads / L) * G * D);
  auto kernel = attn_partial_kernel<T, L>;
  if (smem > 48 * 1024) AF_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         static_cast<int>(smem)));
  const long long blocks = static_cast<long long>(batch) * KV * nsplit;
  Pdl pdl;
  const int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  return launch_ex(kernel, dim3(static_cast<unsigned>(blocks)), kAttnThreads, smem, pdl, stream, H, KV,
                   max_seq, nsplit, static_cast<const T*>(q), static_cast<const T*>(kc), static_cast<const T*>(vc),
                   positions, window, scale, part);
}

template <typename T>
int run_attention(int batch, int H, int KV, int D, int max_seq, const void* q, const void* kc, const void* vc,
                  const int64_t* positions, int window, float scale, void* out, float* part, cudaStream_t stream) {
  constexpr int V = TypeOps<T>::kVec;
  int st = ADAFUSE_ERR_INVALID_ARGUMENT;
  switch (D / V) {
    case 1: st = launch_attn_partial<T, 1>(batch, H, KV, max_seq, q, kc, vc, positions, window, scale, part, stream); break;
    case 2: st = launch_attn_partial<T, 2>(batch, H, KV, max_seq, q, kc, vc, positions, window, scale, part, stream); break;
    case 4: st = launch_attn_partial<T, 4>(batch, H, KV, max_seq, q, kc, vc, positions, window, scale, part, stream); break;
    case 8: st = launch_attn_partial<T, 8>(batch, H, KV, max_seq, q, kc, vc, positions, window, scale, part, stream); break;
    case 16: st = launch_attn_partial<T, 16>(batch, H, KV, max_seq, q, kc, vc, positions, window, scale, part, stream); break;
    case 32: st = launch_attn_partial<T, 32>(batch, H, KV, max_seq, q, kc, vc, positions, window, scale, part, stream); break;
    default: break;
  }
  if (st != ADAFUSE_OK) return st;
  const int nsplit = attn_nsplit(max_seq, D, static_cast<int>(sizeof(T)));
  const int groups = kCombineThreads / D > 0 ? kCombineThreads / D : 1;
  const size_t smem = sizeof(float) * (static_cast<size_t>(nsplit) + static_cast<size_t>(groups) * D);
  if (smem > 48 * 1024) AF_CUDA_TRY(cudaFuncSetAttribute(attn_combine_kernel<T>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         static_cast<int>(smem)));
  Pdl pdl;
  st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  return launch_ex(attn_combine_kernel<T>, dim3(batch * H), kCombineThreads, smem, pdl, stream, D,
                   nsplit, static_cast<const float*>(part), static_cast<T*>(out));
}

bool attention_shape_ok(adafuse_dtype dtype, int H, int KV, int D) {
  if (!valid_dtype(dtype) || H <= 0 || KV <= 0 || H % KV != 0 || H / KV > kAttnMaxGroup || D <= 0) return false;
  const int V = 16 / elem_size(dtype);
  if (D % V != 0) return false;
  const int L = D / V;
  return L <= 32 && (L & (L - 1)) == 0;
}

}  // namespace
}  // namespace adafuse

using namespace adafuse;

extern "C" {

int adafuse_add_rms_norm(adafuse_dtype dtype, int rows, int hidden, void* h, const void* delta,
                         const void* weight, float eps, void* out, cudaStream_t stream) {
  if (!valid_dtype(dtype) || rows < 0 || hidden <= 0 || !h || !weight || !out || !(eps >= 0.f))
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return ADAFUSE_OK;
  switch (dtype) {
    case ADAFUSE_FLOAT32: return launch_norm<float>(rows, hidden, h, delta, weight, eps, out, stream);
    case ADAFUSE_FLOAT16: return launch_norm<__half>(rows, hidden, h, delta, weight, eps, out, stream);
    case ADAFUSE_BFLOAT16: return launch_norm<__nv_bfloat16>(rows, hidden, h, delta, weight, eps, out, stream);
  }
  return ADAFUSE_ERR_INVALID_ARGUMENT;
}

int adafuse_rope_kv_write(adafuse_dtype dtype, int batch, int seq, int num_heads, int num_kv_heads, int head_dim,
                          const void* q, long long ldq, const void* k, long long ldk, const void* v, long long ldv,
                          const void* cos, const void* sin, const int64_t* positions, void* q_out,
                          void* k_cache, void* v_cache, int max_seq, cudaStream_t stream) {
  if (!valid_dtype(dtype) || batch < 0 || seq < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 ||
      head_dim % 2 != 0 || max_seq <= 0 || ldq < static_cast<long long>(num_heads) * head_dim ||
      ldk < static_cast<long long>(num_kv_heads) * head_dim || ldv < static_cast<long long>(num_kv_heads) * head_dim ||
      !q || !k || !v || !cos || !sin || !positions || !q_out || !k_cache || !v_cache)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  const long long total = static_cast<long long>(batch) * seq * (num_heads + num_kv_heads) * (head_dim / 2);
  if (total == 0) return ADAFUSE_OK;
  const int threads = 256;
  const long long blocks = (total + threads - 1) / threads;
  if (blocks > 0x7fffffffLL) return ADAFUSE_ERR_INVALID_ARGUMENT;
  Pdl pdl;
  int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  st = ADAFUSE_ERR_INVALID_ARGUMENT;
#define AF_ROPE(T)                                                                                                  \
  st = launch_ex(rope_kv_kernel<T>, dim3(static_cast<unsigned>(blocks)), threads, 0, pdl, stream, batch * seq, seq, \
                 num_heads, num_kv_heads, head_dim, static_cast<const T*>(q), ldq, static_cast<const T*>(k), ldk,     \
                 static_cast<const T*>(v), ldv, static_cast<const T*>(cos), static_cast<const T*>(sin), positions,    \
                 static_cast<T*>(q_out), static_cast<T*>(k_cache), static_cast<T*>(v_cache), max_seq)
  switch (dtype) {
    case ADAFUSE_FLOAT32: AF_ROPE(float); break;
    case ADAFUSE_FLOAT16: AF_ROPE(__half); break;
    case ADAFUSE_BFLOAT16: AF_ROPE(__nv_bfloat16); break;
  }
#undef AF_ROPE
  return st;
}

int adafuse_silu_mul(adafuse_dtype dtype, int rows, int inter, const void* gate, const void* up, long long ld,
                     void* out, cudaStream_t stream) {
  if (!valid_dtype(dtype) || rows < 0 || inter <= 0 || ld < inter || !gate || !up || !out)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  const long long total = static_cast<long long>(rows) * inter;
  if (total == 0) return ADAFUSE_OK;
  const int threads = 256;
  const long long blocks = (total + threads - 1) / threads;
  if (blocks > 0x7fffffffLL) return ADAFUSE_ERR_INVALID_ARGUMENT;
  Pdl pdl;
  int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  st = ADAFUSE_ERR_INVALID_ARGUMENT;
#define AF_SILU(T)                                                                                       \
  st = launch_ex(silu_mul_kernel<T>, dim3(static_cast<unsigned>(blocks)), threads, 0, pdl, stream, rows, inter, \
                 static_cast<const T*>(gate), static_cast<const T*>(up), ld, static_cast<T*>(out))
  switch (dtype) {
    case ADAFUSE_FLOAT32: AF_SILU(float); break;
    case ADAFUSE_FLOAT16: AF_SILU(__half); break;
    case ADAFUSE_BFLOAT16: AF_SILU(__nv_bfloat16); break;
  }
#undef AF_SILU
  return st;
}

size_t adafuse_decode_attention_workspace_size(int batch, int num_heads, int head_dim, int max_seq) {
  if (batch <= 0 || num_heads <= 0 || head_dim <= 0 || max_seq <= 0) return 0;
  // sized for the smallest chunk (float32), so one size serves every dtype
  return sizeof(float) * static_cast<size_t>(batch) * num_heads * attn_nsplit(max_seq, head_dim, 4) * (head_dim + 2);
}

int adafuse_decode_attention(adafuse_dtype dtype, int batch, int num_heads, int num_kv_heads, int head_dim,
                             int max_seq, const void* q, const void* k_cache, const void* v_cache,
                             const int64_t* positions, int window, float scale, void* out, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  if (!attention_shape_ok(dtype, num_heads, num_kv_heads, head_dim) || batch < 0 || max_seq <= 0 || !q ||
      !k_cache || !v_cache || !positions || !out || !(scale > 0.f) ||
      static_cast<long long>(batch) * num_kv_heads * attn_nsplit(max_seq, head_dim, 4) > 0x7fffffffLL)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (batch == 0) return ADAFUSE_OK;
  if (!aligned16(q) || !aligned16(k_cache) || !aligned16(v_cache)) return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (!workspace || workspace_bytes < adafuse_decode_attention_workspace_size(batch, num_heads, head_dim, max_seq))
    return ADAFUSE_ERR_WORKSPACE;
  auto* part = static_cast<float*>(workspace);
  switch (dtype) {
    case ADAFUSE_FLOAT32:
      return run_attention<float>(batch, num_heads, num_kv_heads, head_dim, max_seq, q, k_cache, v_cache, positions,
                                  window, scale, out, part, stream);
    case ADAFUSE_FLOAT16:
      return run_attention<__half>(batch, num_heads, num_kv_heads, head_dim, max_seq, q, k_cache, v_cache, positions,
                                   window, scale, out, part, stream);
    case ADAFUSE_BFLOAT16:
      return run_attention<__nv_bfloat16>(batch, num_heads, num_kv_heads, head_dim, max_seq, q, k_cache, v_cache,
                                          positions, window, scale, out, part, stream);
  }
  return ADAFUSE_ERR_INVALID_ARGUMENT;
}

}  // extern "C"
