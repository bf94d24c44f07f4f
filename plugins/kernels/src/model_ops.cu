// model_ops.cu - the model operations between the projections, for the GPU decoder's decode step
// (adafuse_add_rms_norm, adafuse_rope_kv_write, adafuse_silu_mul, adafuse_decode_attention) and the
// native backend's prefill and decode of every family (adafuse_embed ... adafuse_route_topk). One
// kernel per operation; the decode-step entry points are special cases of the model operations:
//   norm_kernel          h += delta; out = rmsnorm(h) * w or * (1 + w); rows or per-head  (block per row)
//   rope_kernel          q' = rope(q); cache[slot, pos] = rope(k), v; full or partial rotary dims
//   act_mul_kernel       out = act(g) * u, act = silu or gelu_tanh
//   attn_partial_kernel  split-K (flash-decoding) GQA attention of one query per sequence over the
//   attn_combine_kernel  static KV cache: partial softmax per key chunk, then a combine
//   prefill_attn_kernel  causal GQA attention of many queries per sequence: query tile x head x
//                        sequence per block, key tiles in shared memory, online softmax (float32,
//                        and head_dim 8 of the 16-bit dtypes)
//   prefill_attn_mma_kernel  the same on tensor cores (bfloat16, float16, head_dim % 16 == 0):
//                        flash-attention-2 with mma.sync m16n8k16
//   embed / gather_rows / logits_to_float / route_topk: row copies, the final logits, the router.
// Every intermediate is rounded to the storage dtype where the PyTorch reference rounds
// (adafuse_export/families/features.py, reference/model.py), so the kernels compute its function.
#include "common.cuh"

#include <limits.h>
#include <math.h>

#include <type_traits>

namespace adafuse {
namespace {

constexpr int kNormThreads = 256;
constexpr int kAttnThreads = 128;
constexpr int kAttnMaxGroup = ADAFUSE_ATTN_MAX_GROUP;  // query heads per KV head
constexpr int kElementThreads = 256;

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

// ---- embedding ----------------------------------------------------------------
// out[n] = T(table[ids[n]] * T(scale)): the reference multiplies by a tensor of the model dtype.
template <typename T>
__global__ void embed_kernel(int hidden, long long vocab, const int64_t* __restrict__ ids, const T* __restrict__ table,
                             float scale, T* __restrict__ out) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  const size_t n = blockIdx.x;
  const long long id = ids[n];
  if (id < 0 || id >= vocab) return;  // the runtime checks ids on the host; never read outside the table
  const float s = rt<T>(scale);
  const T* src = table + static_cast<size_t>(id) * hidden;
  T* dst = out + n * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = rnd<T>(ldf(src + i) * s);
}

// ---- add + RMSNorm, per row or per head ---------------------------------------------
// Row r of the launch is head r % per of token r / per: h + (r / per) * ldh + (r % per) * hidden
// (per = 1: whole rows). h_new = T(h + delta) (a separate add rounds there); then
//   RMS:      out = T(w * T(h_new * inv))          inv = rsqrt(mean(h_new^2) + eps)
//   ONE_PLUS: out = T(h_new * inv * (1 + w))       (Gemma: the scale in float32 before the cast)
// out may alias h (in place): each thread re-reads and writes only its own elements.
template <typename T, bool VEC, bool ONE_PLUS>
__global__ void __launch_bounds__(kNormThreads)
norm_kernel(int hidden, int per, T* h, long long ldh, const T* delta, long long ldd, const T* __restrict__ w,
            float eps, T* out, long long ldo) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  __shared__ float red[kNormThreads / 32];
  const long long tok = blockIdx.x / per, sub = blockIdx.x % per;
  T* hr = h + tok * ldh + sub * hidden;
  const T* dr = delta ? delta + tok * ldd + sub * hidden : nullptr;
  T* orow = out + tok * ldo + sub * hidden;
  const int nthreads = blockDim.x;
  float ss = 0.f;
  if (VEC) {
    constexpr int V = TypeOps<T>::kVec;
    for (int v = threadIdx.x; v < hidden / V; v += nthreads) {
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
    for (int i = threadIdx.x; i < hidden; i += nthreads) {
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
    for (int v = threadIdx.x; v < hidden / V; v += nthreads) {
      float a[V], ww[V];
      unpack16<T>(reinterpret_cast<const uint4*>(hr)[v], a);
      unpack16<T>(reinterpret_cast<const uint4*>(w)[v], ww);
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = ONE_PLUS ? a[i] * inv * (ww[i] + 1.f) : ww[i] * rt<T>(a[i] * inv);
      reinterpret_cast<uint4*>(orow)[v] = pack16<T>(a);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += nthreads) {
      const float a = ldf(hr + i), ww = ldf(w + i);
      orow[i] = rnd<T>(ONE_PLUS ? a * inv * (ww + 1.f) : ww * rt<T>(a * inv));
    }
  }
}

// ---- RoPE + KV-cache write ----------------------------------------------------
// One thread per (token n, head, j < D - R/2) of the q heads, then the k heads (which also write v):
// j < R/2 rotates the pair (j, j + R/2), j >= R/2 copies dim j + R/2 (the unrotated tail of a partial
// rotary head). rope(x)[i] = T(T(x_i c_i) + T(-x_{i+R/2} s_i)), rope(x)[i+R/2] = T(T(x_{i+R/2} c_{i+R/2})
// + T(x_i s_{i+R/2})): x*cos + rotate_half(x)*sin. cos/sin come from per-token tables (the decoder's
// adafuse_rope_kv_write) or from the frequencies: T(cosf(float(pos) * f_i) * attention_factor).
template <typename T>
struct RopeArgs {
  int H, KV, D, R;
  const T* q; long long ldq; const T* k; long long ldk; const T* v; long long ldv;
  const T* cos_table; const T* sin_table;  // [tokens, D], or NULL: from the frequencies below
  const float* inv_freq; const float* long_inv_freq; const uint8_t* use_long; float attention_factor;
  const int32_t* slots; int seq;  // cache row slots[n], or n / seq when slots is NULL
  const int64_t* positions;
  T* q_out; T* k_cache; T* v_cache; int max_seq;
};

template <typename T>
__global__ void rope_kernel(long long total, RopeArgs<T> a) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int D = a.D, half = a.R / 2, per_head = D - half;
  const long long per_token = static_cast<long long>(a.H + a.KV) * per_head;
  const long long n = idx / per_token;
  const int rem = static_cast<int>(idx % per_token);
  const int head = rem / per_head, j = rem % per_head;
  const long long p = a.positions[n];
  float c0 = 1.f, c1 = 1.f, s0 = 0.f, s1 = 0.f;
  if (j < half) {
    if (a.cos_table) {
      const T* cr = a.cos_table + n * D;
      const T* sr = a.sin_table + n * D;
      c0 = ldf(cr + j), c1 = ldf(cr + j + half), s0 = ldf(sr + j), s1 = ldf(sr + j + half);
    } else {
      const float* f = (a.use_long && a.long_inv_freq && a.use_long[n]) ? a.long_inv_freq : a.inv_freq;
      const float ang = static_cast<float>(p) * f[j];
      c0 = c1 = rt<T>(cosf(ang) * a.attention_factor);
      s0 = s1 = rt<T>(sinf(ang) * a.attention_factor);
    }
  }
  if (head < a.H) {
    const T* x = a.q + n * a.ldq + static_cast<size_t>(head) * D;
    T* o = a.q_out + (static_cast<size_t>(n) * a.H + head) * D;
    if (j < half) {
      const float x0 = ldf(x + j), x1 = ldf(x + j + half);
      o[j] = rnd<T>(rt<T>(x0 * c0) + rt<T>(-x1 * s0));
      o[j + half] = rnd<T>(rt<T>(x1 * c1) + rt<T>(x0 * s1));
    } else {
      o[j + half] = x[j + half];
    }
    return;
  }
  const int kh = head - a.H;
  const long long slot = a.slots ? static_cast<long long>(a.slots[n]) : n / a.seq;
  if (p < 0 || p >= a.max_seq || slot < 0) return;  // out of the cache: nothing written (the caller checks)
  const size_t dst = ((static_cast<size_t>(slot) * a.KV + kh) * a.max_seq + p) * D;
  const T* x = a.k + n * a.ldk + static_cast<size_t>(kh) * D;
  const T* vr = a.v + n * a.ldv + static_cast<size_t>(kh) * D;
  if (j < half) {
    const float x0 = ldf(x + j), x1 = ldf(x + j + half);
    a.k_cache[dst + j] = rnd<T>(rt<T>(x0 * c0) + rt<T>(-x1 * s0));
    a.k_cache[dst + j + half] = rnd<T>(rt<T>(x1 * c1) + rt<T>(x0 * s1));
    a.v_cache[dst + j] = vr[j];
    a.v_cache[dst + j + half] = vr[j + half];
  } else {
    a.k_cache[dst + j + half] = x[j + half];
    a.v_cache[dst + j + half] = vr[j + half];
  }
}

// ---- activation * up ----------------------------------------------------------------
// out = T(T(act(g)) * u) in float32: silu(g) = g / (1 + exp(-g)); gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi)
// (g + 0.044715 g^3))).
template <typename T, int ACT>
__global__ void act_mul_kernel(int rows, int inter, const T* __restrict__ g, const T* __restrict__ u, long long ld,
                               T* __restrict__ out) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long long>(rows) * inter) return;
  const long long n = idx / inter, i = idx % inter;
  const float gv = ldf(g + n * ld + i);
  float act;
  if (ACT == ADAFUSE_ACT_SILU) {
    act = gv / (1.f + expf(-gv));
  } else {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    act = 0.5f * gv * (1.f + tanhf(kSqrt2OverPi * (gv + 0.044715f * gv * gv * gv)));
  }
  out[idx] = rnd<T>(rt<T>(act) * ldf(u + n * ld + i));
}

// ---- row gather and final logits ----------------------------------------------------
template <typename T>
__global__ void gather_rows_kernel(int cols, const T* __restrict__ src, long long ld_src,
                                   const int32_t* __restrict__ index, T* __restrict__ dst, long long ld_dst) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  const long long i = blockIdx.x;
  const int from = index[i];
  if (from < 0) return;  // documented: a negative index leaves its row untouched
  for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[i * ld_dst + c] = src[from * ld_src + c];
}

template <typename T>
__global__ void logits_kernel(long long total, long long vocab, const T* __restrict__ in, long long ld_in,
                              float softcap, float* __restrict__ out) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const long long r = idx / vocab, c = idx % vocab;
  float v = ldf(in + r * ld_in + c);
  if (softcap > 0.f) v = tanhf(v / softcap) * softcap;  // features.softcap: tanh(x / cap) * cap
  out[idx] = v;
}

// ---- softmax router -------------------------------------------------------------------
// One block per row: a warp per expert's dot product, then warp 0 takes the softmax and the top_k
// by repeated arg-max (larger probability first, the lower expert id on a tie: a stable sort).
constexpr int kRouteThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRouteThreads)
route_topk_kernel(int in, const T* __restrict__ x, long long ldx, const float* __restrict__ weight,
                  const float* __restrict__ bias, int experts, int top_k, int normalize, int32_t* __restrict__ ids,
                  float* __restrict__ gates) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  __shared__ float logit[ADAFUSE_LORA_MAX_EXPERTS];
  const long long row = blockIdx.x;
  const T* xr = x + row * ldx;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int e = warp; e < experts; e += kRouteThreads / 32) {
    const float* wr = weight + static_cast<size_t>(e) * in;
    float s = 0.f;
    for (int i = lane; i < in; i += 32) s = fmaf(ldf(xr + i), wr[i], s);
    s = warp_sum(s);
    if (lane == 0) logit[e] = s + (bias ? bias[e] : 0.f);
  }
  __syncthreads();
  if (warp != 0) return;
  constexpr int kPerLane = ADAFUSE_LORA_MAX_EXPERTS / 32;
  float p[kPerLane];
  float m = -INFINITY;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int e = lane + 32 * u;
    p[u] = e < experts ? logit[e] : -INFINITY;
    m = fmaxf(m, p[u]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    p[u] = lane + 32 * u < experts ? expf(p[u] - m) : 0.f;
    sum += p[u];
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) p[u] = lane + 32 * u < experts ? p[u] / sum : -1.f;  // -1: no expert
  float chosen[ADAFUSE_MAX_TOP_K];
  int chosen_id[ADAFUSE_MAX_TOP_K];
  float total = 0.f;
  for (int j = 0; j < top_k; ++j) {
    float best = -2.f;
    int best_e = 0x7fffffff;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {  // ascending ids per lane: a strict > keeps the lower id
      if (p[u] > best) best = p[u], best_e = lane + 32 * u;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) best = ob, best_e = oe;
    }
#pragma unroll
    for (int u = 0; u < kPerLane; ++u)
      if (lane + 32 * u == best_e) p[u] = -2.f;  // taken
    chosen[j] = best;
    chosen_id[j] = best_e;
    total += best;
  }
  if (lane == 0) {
    for (int j = 0; j < top_k; ++j) {
      ids[row * top_k + j] = chosen_id[j];
      gates[row * top_k + j] = normalize ? chosen[j] / total : chosen[j];
    }
  }
}

// ---- decode attention (split-K) -------------------------------------------------
// Block (sequence i, kv head, split) takes keys [split*C, split*C + C) ∩ allowed of cache row
// seq_slots[i] for the G query heads of that KV head and the sequence's one query token
// n = seq_starts[i] (both NULL: sequence = query = cache row b), C = kAttnU * kAttnThreads / L.
// L = D/V lanes hold one key's 16-byte vectors. Every thread issues all its K and V loads (kAttnU of
// each) before the first use, so a block waits for memory about once instead of once per key batch.
// Writes the unnormalised partial output acc[D], the chunk max m and sum l per query head of token n.
constexpr int kAttnU = 8;

template <typename T, int L>
__global__ void __launch_bounds__(kAttnThreads)
attn_partial_kernel(int H, int KV, int max_seq, int nsplit, const T* __restrict__ q,
                    const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                    const int32_t* __restrict__ seq_starts, const int32_t* __restrict__ seq_slots,
                    const int64_t* __restrict__ positions, int window, float scale, float softcap,
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
  const int seq = blockIdx.x / (nsplit * KV);
  long long n = seq, slot = seq;
  if (seq_starts) {
    n = seq_starts[seq];
    if (seq_starts[seq + 1] <= n) return;  // a sequence without a query this call
    slot = seq_slots[seq];
  }
  const long long pos = positions[n];
  long long lo = static_cast<long long>(split) * C, hi = lo + C;  // [lo, hi)
  if (hi > pos + 1) hi = pos + 1;
  if (window > 0 && lo < pos - window + 1) lo = pos - window + 1;
  if (hi > max_seq) hi = max_seq;
  const int cnt = hi > lo ? static_cast<int>(hi - lo) : 0;
  const size_t row0 = static_cast<size_t>(n) * H + static_cast<size_t>(kh) * G;  // first query head
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
  const T* kbase = k_cache + ((static_cast<size_t>(slot) * KV + kh) * max_seq + lo) * D + li * V;
  const T* vbase = v_cache + ((static_cast<size_t>(slot) * KV + kh) * max_seq + lo) * D + li * V;
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
      if (softcap > 0.f) s = tanhf(s / softcap) * softcap;  // features.softcap
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

// One block per (query token, head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s. The
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

// ---- prefill attention (tiled, online softmax) ---------------------------------------------
// Block (query tile, head h, sequence i): the sequence's queries [seq_starts[i] + tile*BQ, + BQ)
// for query head h, over the keys of cache row seq_slots[i] from the lowest key any of them may
// see to the highest (the union of their causal and window ranges), BK keys per shared-memory tile.
// Thread (r, c) of the 4 lanes of query row r: scores of keys c + 4u, then dims c + 4i of the
// output, with the running max m and sum l of its row (the flash-attention recurrence in float32).
// A key a query may not see scores -inf and adds nothing, also when its cache slot holds NaN.
constexpr int kPrefillThreads = 128;
constexpr int kPrefillBQ = 32;
constexpr int kPrefillBK = 32;
constexpr int kRowLanes = kPrefillThreads / kPrefillBQ;  // 4 lanes per query row

size_t prefill_smem(int D) {
  return sizeof(float) * (static_cast<size_t>(kPrefillBQ + 2 * kPrefillBK) * (D + 1) +
                          static_cast<size_t>(kPrefillBQ) * (kPrefillBK + 1));
}

template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads)
prefill_attn_kernel(int H, int KV, int max_seq, const T* __restrict__ q, const T* __restrict__ k_cache,
                    const T* __restrict__ v_cache, const int32_t* __restrict__ seq_starts,
                    const int32_t* __restrict__ seq_slots, const int64_t* __restrict__ positions, int window,
                    float scale, float softcap, T* __restrict__ out) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  constexpr int BQ = kPrefillBQ, BK = kPrefillBK, S = D + 1;  // S: padded row stride (no bank conflicts)
  constexpr int NI = D / kRowLanes >= 1 ? D / kRowLanes : 1, NU = BK / kRowLanes;
  static_assert(D % kRowLanes == 0, "head_dim must be a multiple of the lanes per row");
  extern __shared__ float smem[];
  float* qs = smem;             // [BQ][S] q * scale
  float* ks = qs + BQ * S;      // [BK][S]
  float* vs = ks + BK * S;      // [BK][S]
  float* ps = vs + BK * S;      // [BQ][BK + 1] probabilities of the tile
  __shared__ long long pos_min[kPrefillThreads / 32], pos_max[kPrefillThreads / 32];
  const int seq = blockIdx.z, h = blockIdx.y;
  const int s0 = seq_starts[seq], s1 = seq_starts[seq + 1];
  const int q0 = s0 + static_cast<int>(blockIdx.x) * BQ;
  if (q0 >= s1) return;  // block-uniform: this sequence has fewer query tiles
  const int nq = min(BQ, s1 - q0);
  const long long slot = seq_slots[seq];
  const int kh = h / (H / KV);
  const int tid = threadIdx.x, r = tid / kRowLanes, c = tid % kRowLanes;
  const bool has_q = r < nq;
  const long long qpos = has_q ? positions[q0 + r] : 0;
  for (int x = tid; x < BQ * D; x += kPrefillThreads) {
    const int rr = x / D, d = x % D;
    qs[rr * S + d] = rr < nq ? ldf(q + (static_cast<size_t>(q0 + rr) * H + h) * D + d) * scale : 0.f;
  }
  // the tile's key range [lo, hi): min and max position over its queries
  long long mn = has_q ? qpos : LLONG_MAX, mx = has_q ? qpos : LLONG_MIN;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  if ((tid & 31) == 0) pos_min[tid >> 5] = mn, pos_max[tid >> 5] = mx;
  __syncthreads();
  mn = pos_min[0], mx = pos_max[0];
#pragma unroll
  for (int w = 1; w < kPrefillThreads / 32; ++w) mn = min(mn, pos_min[w]), mx = max(mx, pos_max[w]);
  long long lo = window > 0 ? mn - window + 1 : 0, hi = mx + 1;
  if (lo < 0) lo = 0;
  if (hi > max_seq) hi = max_seq;
  const T* kbase = k_cache + (static_cast<size_t>(slot) * KV + kh) * static_cast<size_t>(max_seq) * D;
  const T* vbase = v_cache + (static_cast<size_t>(slot) * KV + kh) * static_cast<size_t>(max_seq) * D;
  float acc[NI];
#pragma unroll
  for (int i = 0; i < NI; ++i) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (long long k0 = lo; k0 < hi; k0 += BK) {
    __syncthreads();  // the previous tile is no longer read
    for (int x = tid; x < BK * D; x += kPrefillThreads) {
      const int j = x / D, d = x % D;
      const bool in = k0 + j < hi;
      ks[j * S + d] = in ? ldf(kbase + (k0 + j) * D + d) : 0.f;
      vs[j * S + d] = in ? ldf(vbase + (k0 + j) * D + d) : 0.f;
    }
    __syncthreads();
    float s[NU];
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int j = c + kRowLanes * u;
      const long long kp = k0 + j;
      float dot = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) dot = fmaf(qs[r * S + d], ks[j * S + d], dot);
      if (softcap > 0.f) dot = tanhf(dot / softcap) * softcap;  // features.softcap
      const bool allowed = has_q && kp < hi && kp <= qpos && (window <= 0 || kp > qpos - window);
      s[u] = allowed ? dot : -INFINITY;
      tile_max = fmaxf(tile_max, s[u]);
    }
#pragma unroll
    for (int o = 1; o < kRowLanes; o <<= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
    const float m_new = fmaxf(m, tile_max);
    const float corr = m_new == -INFINITY ? 1.f : expf(m - m_new);  // m = -inf, m_new finite: 0
    float psum = 0.f;
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const float p = s[u] == -INFINITY ? 0.f : expf(s[u] - m_new);
      ps[r * (BK + 1) + c + kRowLanes * u] = p;
      psum += p;
    }
#pragma unroll
    for (int o = 1; o < kRowLanes; o <<= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
    l = l * corr + psum;
    m = m_new;
#pragma unroll
    for (int i = 0; i < NI; ++i) acc[i] *= corr;
    __syncwarp();  // row r's probabilities come from its 4 lanes, all in this warp
    for (int j = 0; j < BK; ++j) {
      const float p = ps[r * (BK + 1) + j];
      if (p != 0.f) {  // never 0 * NaN from a slot no query may see
#pragma unroll
        for (int i = 0; i < NI; ++i) acc[i] = fmaf(p, vs[j * S + c + kRowLanes * i], acc[i]);
      }
    }
  }
  if (has_q) {
    T* o = out + (static_cast<size_t>(q0 + r) * H + h) * D;
#pragma unroll
    for (int i = 0; i < NI; ++i) o[c + kRowLanes * i] = rnd<T>(acc[i] / l);
  }
}

// ---- prefill attention on tensor cores (bfloat16, float16; sm_80+) ----------------------------
// prefill_attn_kernel's attention (same block range, masks, softcap, online softmax, NaN rule; only
// the probabilities are rounded, see P below) computed flash-attention-2 style: block (query tile of kTcBQ rows, head h, sequence i), warp w of
// its 4 takes query rows [16w, 16w + 16); key tiles of BK rows of K and V in shared memory, filled
// by cp.async one tile ahead (double buffering). Per key tile and warp:
//   S = Q K^T           mma.sync m16n8k16, float32 accumulators (products of 16-bit values are exact)
//   s = softcap(S * scale), -inf where the query may not see the key; running max m and sum l of
//   the unrounded exp(s - m) per row in float32 registers (the quad of lanes of a row reduces them)
//   O = O * e^(m_old - m) + T(P) V   P rounded to the model dtype as the reference rounds its
//                                    probabilities (reference/model.py: softmax(...).to(q.dtype))
// and O / l rounded once at the end. A key no query of the block may see must add nothing even when
// its cache slot holds NaN, but 0 * NaN is NaN inside an mma: a block whose query positions are not
// consecutive (so the union of their key ranges may have holes) zeroes the V rows of such keys;
// consecutive positions (a prompt or a chunk of one) see every key of [lo, hi).
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type"), g = lane >> 2 (groupID),
// t = lane & 3 (threadID_in_group); a 32-bit register holds two 16-bit elements, the lower column
// (A, C) or row (B) in its low half:
//   A 16x16 row-major   a0: (row g,   cols 2t, 2t+1)   a1: (row g+8, cols 2t, 2t+1)
//                       a2: (row g,   cols 2t+8, +9)   a3: (row g+8, cols 2t+8, +9)
//   B 16x8 (k x n)      b0: (rows k = 2t, 2t+1, col n = g)   b1: (rows 2t+8, 2t+9, col g)
//   C 16x8 float32      c0, c1: (row g, cols 2t, 2t+1)       c2, c3: (row g+8, cols 2t, 2t+1)
// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i;
// register i of lane l receives matrix i's (row l >> 2, cols 2(l & 3), +1); with .trans it receives
// (rows 2(l & 3), +1 of col l >> 2), i.e. the transposed matrix. Hence, lane l addressing:
//   Q A fragment (16 rows x 16 dims):  row (l & 7) + 8((l >> 3) & 1), dim 8(l >> 4)  -> a0..a3
//   K as B (k = dim, n = key), K row-major [key][dim] is B column-major, no .trans:
//       key (l & 7) + 8(l >> 4), dim 8((l >> 3) & 1)  -> {r0, r1} = B of keys 0-7, {r2, r3} keys 8-15
//   V as B (k = key, n = dim), V row-major [key][dim] is B row-major, .trans:
//       key (l & 7) + 8((l >> 3) & 1), dim 8(l >> 4)  -> {r0, r1} = B of dims 0-7, {r2, r3} dims 8-15
//   P as A: the C fragments of S for keys 16k..16k+15 (n-tiles 2k, 2k+1) are P's A fragment:
//       a0 = S[2k].{c0,c1}, a1 = S[2k].{c2,c3}, a2 = S[2k+1].{c0,c1}, a3 = S[2k+1].{c2,c3}.
// Shared-memory rows are padded to D + 8 elements, so the 8 rows one ldmatrix matrix reads start
// 16 bytes apart modulo 128 and hit distinct banks.
constexpr int kTcThreads = 128;
constexpr int kTcBQ = 64;  // 16 query rows per warp

template <int D>
struct TcTile {
  static constexpr int BK = D <= 128 ? 64 : 32;  // keys per tile: D = 256 fits 99 KiB (sm_86, 89, 120)
  static constexpr int LD = D + 8;               // row pitch in elements (bank-conflict-free ldmatrix)
  static constexpr size_t smem = 2 * static_cast<size_t>(kTcBQ + 4 * BK) * LD;  // Q, 2 x K, 2 x V
};

// Whether the tensor-core kernel covers (T, D): 16-bit dtypes, D a multiple of the mma's k = 16.
template <typename T, int D>
constexpr bool tc_prefill_covers() {
  return sizeof(T) == 2 && D % 16 == 0 && D <= 256;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // round both to T; lo in the low half
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads)
prefill_attn_mma_kernel(int H, int KV, int max_seq, const T* __restrict__ q, const T* __restrict__ k_cache,
                        const T* __restrict__ v_cache, const int32_t* __restrict__ seq_starts,
                        const int32_t* __restrict__ seq_slots, const int64_t* __restrict__ positions, int window,
                        float scale, float softcap, T* __restrict__ out) {
  pdl_launch_dependents();  // programmatic dependent launch: see launch_ex
  pdl_wait();
  constexpr int BQ = kTcBQ, BK = TcTile<D>::BK, LD = TcTile<D>::LD;
  constexpr int CH = D / 8;             // 16-byte chunks per row
  constexpr int NS = BK / 8, NO = D / 8;  // n-tiles of S (keys) and of O (dims)
  constexpr int WARPS = kTcThreads / 32;
  static_assert(D % 16 == 0 && BK % 16 == 0 && BQ == 16 * WARPS, "tile shape");
  extern __shared__ uint4 prefill_tc_smem[];
  T* qs = reinterpret_cast<T*>(prefill_tc_smem);  // [BQ][LD]
  T* ks = qs + BQ * LD;                            // [2][BK][LD]
  T* vs = ks + 2 * BK * LD;                        // [2][BK][LD]
  // the block's position reductions borrow V buffer 1 (first filled by iteration 0's cp.async, after
  // the barrier below): no static shared memory, so D = 256 fits 99 KiB
  long long* pos_min = reinterpret_cast<long long*>(vs + BK * LD);
  long long* pos_max = pos_min + WARPS;
  static_assert(2 * WARPS * sizeof(long long) <= BK * LD * sizeof(T), "V buffer 1 holds the reductions");
  const int seq = blockIdx.z, h = blockIdx.y;
  const int s0 = seq_starts[seq], s1 = seq_starts[seq + 1];
  const int q0 = s0 + static_cast<int>(blockIdx.x) * BQ;
  if (q0 >= s1) return;  // block-uniform: this sequence has fewer query tiles
  const int nq = min(BQ, s1 - q0);
  const long long slot = seq_slots[seq];
  const int kh = h / (H / KV);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;

  // the Q tile (rows past the sequence's queries zero) joins the first K/V tile's cp.async group
  for (int x = tid; x < BQ * CH; x += kTcThreads) {
    const int r = x / CH, c = x % CH;
    const bool in = r < nq;
    cp_async16(qs + r * LD + c * 8, q + (static_cast<size_t>(in ? q0 + r : q0) * H + h) * D + c * 8, in);
  }
  // the block's key range [lo, hi): min and max position over its queries (thread r < BQ: query r)
  const bool has_row = tid < nq;
  const long long p_t = has_row ? positions[q0 + tid] : 0;
  long long mn = has_row ? p_t : LLONG_MAX, mx = has_row ? p_t : LLONG_MIN;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  if (lane == 0) pos_min[warp] = mn, pos_max[warp] = mx;
  // causal only, or consecutive positions: every key of [lo, hi) is seen by some query of the block
  const bool dense = __syncthreads_and(window <= 0 || !has_row || p_t == positions[q0] + tid);
  mn = pos_min[0], mx = pos_max[0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) mn = min(mn, pos_min[w]), mx = max(mx, pos_max[w]);
  long long lo = window > 0 ? mn - window + 1 : 0, hi = mx + 1;
  if (lo < 0) lo = 0;
  if (hi > max_seq) hi = max_seq;
  __syncthreads();  // pos_min / pos_max read: V buffer 1 may be filled

  // this thread's two query rows (g and g + 8 of its warp's 16) and its warp's position range
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const bool ok0 = r0 < nq, ok1 = r1 < nq;
  const long long qp0 = ok0 ? positions[q0 + r0] : 0, qp1 = ok1 ? positions[q0 + r1] : 0;
  long long wmin = LLONG_MAX, wmax = LLONG_MIN;
  if (ok0) wmin = min(wmin, qp0), wmax = max(wmax, qp0);
  if (ok1) wmin = min(wmin, qp1), wmax = max(wmax, qp1);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    wmin = min(wmin, __shfl_xor_sync(0xffffffffu, wmin, o));
    wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
  }

  const T* kbase = k_cache + (static_cast<size_t>(slot) * KV + kh) * static_cast<size_t>(max_seq) * D;
  const T* vbase = v_cache + (static_cast<size_t>(slot) * KV + kh) * static_cast<size_t>(max_seq) * D;
  auto load_kv = [&](long long k0, int buf) {  // keys >= hi: zeros (no read)
    T* kd = ks + buf * BK * LD;
    T* vd = vs + buf * BK * LD;
#pragma unroll
    for (int x = tid; x < BK * CH; x += kTcThreads) {
      const int j = x / CH, c = x % CH;
      const bool in = k0 + j < hi;
      const size_t off = static_cast<size_t>(in ? k0 + j : lo) * D + c * 8;
      cp_async16(kd + j * LD + c * 8, kbase + off, in);
      cp_async16(vd + j * LD + c * 8, vbase + off, in);
    }
  };

  float o_acc[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[n][e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // rows g, g + 8 (l: this lane's part)
  const int ntiles = hi > lo ? static_cast<int>((hi - lo + BK - 1) / BK) : 0;
  if (ntiles > 0) load_kv(lo, 0);
  cp_async_commit();
  for (int it = 0; it < ntiles; ++it) {
    const long long k0 = lo + static_cast<long long>(it) * BK;
    const int buf = it & 1;
    if (it + 1 < ntiles) load_kv(k0 + BK, buf ^ 1);  // the buffer tile it - 1 used (all warps passed it)
    cp_async_commit();
    cp_async_wait<1>();  // every group but the newest: Q and tile it have landed
    __syncthreads();
    const T* kt = ks + buf * BK * LD;
    const T* vt = vs + buf * BK * LD;
    if (!dense) {  // zero the V rows of keys no query of the block may see (their slots may hold NaN)
      T* vw = vs + buf * BK * LD;
      for (int j = tid; j < BK; j += kTcThreads) {
        const long long kp = k0 + j;
        bool seen = false;
        for (int r = 0; r < nq; ++r) {
          const long long p = positions[q0 + r];
          seen = seen || (kp <= p && (window <= 0 || kp > p - window));
        }
        if (!seen)
          for (int c = 0; c < D; c += 8) *reinterpret_cast<uint4*>(vw + j * LD + c) = make_uint4(0u, 0u, 0u, 0u);
      }
      __syncthreads();
    }
    // warp-uniform: skip a tile whose keys every row of this warp masks (after all its queries,
    // or before all its windows); the recurrence would leave m, l and O unchanged
    const bool live = k0 <= wmax && (window <= 0 || k0 + BK - 1 > wmin - window);
    if (live) {
      float s[NS][4];
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int p = 0; p < NS / 2; ++p) {
          uint32_t b[4];
          ldmatrix_x4(b, kt + (p * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
          Mma<T>::run(s[2 * p], a, b);
          Mma<T>::run(s[2 * p + 1], a, b + 2);
        }
      }
      float m_new[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = e >> 1;  // c0, c1: row g; c2, c3: row g + 8
          const long long kp = k0 + n * 8 + 2 * t4 + (e & 1);
          const long long p = row ? qp1 : qp0;
          float x = s[n][e] * scale;
          if (softcap > 0.f) x = tanhf(x / softcap) * softcap;  // features.softcap
          const bool allowed = (row ? ok1 : ok0) && kp < hi && kp <= p && (window <= 0 || kp > p - window);
          s[n][e] = allowed ? x : -INFINITY;
          m_new[row] = fmaxf(m_new[row], s[n][e]);
        }
      float corr[2];
#pragma unroll
      for (int row = 0; row < 2; ++row) {
        m_new[row] = fmaxf(m_new[row], __shfl_xor_sync(0xffffffffu, m_new[row], 1));
        m_new[row] = fmaxf(m_new[row], __shfl_xor_sync(0xffffffffu, m_new[row], 2));
        corr[row] = m_new[row] == -INFINITY ? 1.f : expf(m_run[row] - m_new[row]);  // m = -inf: 0
        m_run[row] = m_new[row];
        l_run[row] *= corr[row];
      }
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = e >> 1;
          const float pe = s[n][e] == -INFINITY ? 0.f : expf(s[n][e] - m_run[row]);
          s[n][e] = pe;
          l_run[row] += pe;
        }
#pragma unroll
      for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o_acc[n][e] *= corr[e >> 1];
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int p = 0; p < NO / 2; ++p) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + p * 16 + (lane >> 4) * 8);
          Mma<T>::run(o_acc[2 * p], a, b);
          Mma<T>::run(o_acc[2 * p + 1], a, b + 2);
        }
      }
    }
    __syncthreads();  // buffer buf is refilled by the next iteration's load
  }
  cp_async_wait<0>();
#pragma unroll
  for (int row = 0; row < 2; ++row) {
    float l = l_run[row];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = row ? r1 : r0;
    if (r < nq) {
      T* o = out + (static_cast<size_t>(q0 + r) * H + h) * D + 2 * t4;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[n * 8] = rnd<T>(o_acc[n][2 * row] / l);
        o[n * 8 + 1] = rnd<T>(o_acc[n][2 * row + 1] / l);
      }
    }
  }
}

// ---- host side -------------------------------------------------------------------
// Calls f(T{}) with T the storage type of dtype (the caller checked dtype).
template <typename F>
int by_dtype(adafuse_dtype dtype, F&& f) {
  switch (dtype) {
    case ADAFUSE_FLOAT32: return f(float{});
    case ADAFUSE_FLOAT16: return f(__half{});
    case ADAFUSE_BFLOAT16: return f(__nv_bfloat16{});
  }
  return ADAFUSE_ERR_INVALID_ARGUMENT;
}

int element_blocks(long long total, unsigned* blocks) {
  const long long b = (total + kElementThreads - 1) / kElementThreads;
  if (b > 0x7fffffffLL) return ADAFUSE_ERR_INVALID_ARGUMENT;
  *blocks = static_cast<unsigned>(b);
  return ADAFUSE_OK;
}

bool row_vec_ok(long long ld, int V, const void* p) { return p == nullptr || (ld % V == 0 && aligned16(p)); }

// Rows of `per` pieces of `hidden` elements (the norm kernel's mapping); checked by the callers.
template <typename T>
int launch_norm(adafuse_norm_kind kind, long long rows, int per, int hidden, void* h, long long ldh,
                const void* delta, long long ldd, const void* w, float eps, void* out, long long ldo,
                cudaStream_t stream) {
  constexpr int V = TypeOps<T>::kVec;
  const bool vec = hidden % V == 0 && aligned16(w) && row_vec_ok(ldh, V, h) && row_vec_ok(ldd, V, delta) &&
                   row_vec_ok(ldo, V, out);
  const int items = vec ? hidden / V : hidden;
  int threads = (items + 31) / 32 * 32;
  if (threads > kNormThreads) threads = kNormThreads;
  auto* ht = static_cast<T*>(h);
  auto* dt = static_cast<const T*>(delta);
  auto* wt = static_cast<const T*>(w);
  auto* ot = static_cast<T*>(out);
  Pdl pdl;
  const int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  const dim3 grid(static_cast<unsigned>(rows * per));
  const bool one_plus = kind == ADAFUSE_NORM_RMS_ONE_PLUS;
#define AF_NORM(VEC, ONE)                                                                                         \
  launch_ex(norm_kernel<T, VEC, ONE>, grid, threads, 0, pdl, stream, hidden, per, ht, ldh, dt, ldd, wt, eps, ot, \
            ldo)
  if (vec) return one_plus ? AF_NORM(true, true) : AF_NORM(true, false);
  return one_plus ? AF_NORM(false, true) : AF_NORM(false, false);
#undef AF_NORM
}

template <typename T>
int launch_rope(long long tokens, const RopeArgs<T>& a, cudaStream_t stream) {
  const long long total = tokens * (a.H + a.KV) * (a.D - a.R / 2);
  if (total == 0) return ADAFUSE_OK;
  unsigned blocks;
  int st = element_blocks(total, &blocks);
  if (st != ADAFUSE_OK) return st;
  Pdl pdl;
  st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  return launch_ex(rope_kernel<T>, dim3(blocks), kElementThreads, 0, pdl, stream, total, a);
}

int launch_act_mul(adafuse_dtype dtype, adafuse_activation act, int rows, int inter, const void* gate, const void* up,
                   long long ld, void* out, cudaStream_t stream) {
  const long long total = static_cast<long long>(rows) * inter;
  if (total == 0) return ADAFUSE_OK;
  unsigned blocks;
  int st = element_blocks(total, &blocks);
  if (st != ADAFUSE_OK) return st;
  Pdl pdl;
  st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* g = static_cast<const T*>(gate);
    auto* u = static_cast<const T*>(up);
    auto* o = static_cast<T*>(out);
    if (act == ADAFUSE_ACT_SILU)
      return launch_ex(act_mul_kernel<T, ADAFUSE_ACT_SILU>, dim3(blocks), kElementThreads, 0, pdl, stream, rows,
                       inter, g, u, ld, o);
    return launch_ex(act_mul_kernel<T, ADAFUSE_ACT_GELU_TANH>, dim3(blocks), kElementThreads, 0, pdl, stream, rows,
                     inter, g, u, ld, o);
  });
}

// Keys per split: kAttnU * kAttnThreads / L with L = D * element size / 16.
int attn_chunk(int head_dim, int esize) { return kAttnU * kAttnThreads * 16 / (head_dim * esize); }
int attn_nsplit(int max_seq, int head_dim, int esize) {
  const int c = attn_chunk(head_dim, esize);
  return (max_seq + c - 1) / c;
}
// Split-K partials of `rows` query tokens: sized for the smallest chunk (float32), so one size
// serves every dtype.
size_t attn_partials_bytes(long long rows, int num_heads, int head_dim, int max_seq) {
  return sizeof(float) * static_cast<size_t>(rows) * num_heads * attn_nsplit(max_seq, head_dim, 4) * (head_dim + 2);
}

struct AttnCall {
  int seqs, tokens, H, KV, max_seq;
  const void *q, *kc, *vc;
  const int32_t *seq_starts, *seq_slots;  // NULL: sequence = query token = cache row
  const int64_t* positions;
  int window;
  float scale, softcap;
  void* out;
};

template <typename T, int L>
int launch_attn_partial(const AttnCall& a, float* part, cudaStream_t stream) {
  constexpr int D = L * TypeOps<T>::kVec, C = kAttnU * kAttnThreads / L;
  const int G = a.H / a.KV, nsplit = attn_nsplit(a.max_seq, D, static_cast<int>(sizeof(T)));
  const size_t smem = sizeof(float) * (static_cast<size_t>(G) * D + static_cast<size_t>(G) * C +
                                       static_cast<size_t>(kAttnThreads / L) * G * D);
  auto kernel = attn_partial_kernel<T, L>;
  if (smem > 48 * 1024) AF_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         static_cast<int>(smem)));
  const long long blocks = static_cast<long long>(a.seqs) * a.KV * nsplit;
  Pdl pdl;
  const int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  return launch_ex(kernel, dim3(static_cast<unsigned>(blocks)), kAttnThreads, smem, pdl, stream, a.H, a.KV,
                   a.max_seq, nsplit, static_cast<const T*>(a.q), static_cast<const T*>(a.kc),
                   static_cast<const T*>(a.vc), a.seq_starts, a.seq_slots, a.positions, a.window, a.scale, a.softcap,
                   part);
}

template <typename T>
int run_decode_attention(const AttnCall& a, int D, float* part, cudaStream_t stream) {
  constexpr int V = TypeOps<T>::kVec;
  int st = ADAFUSE_ERR_INVALID_ARGUMENT;
  switch (D / V) {
    case 1: st = launch_attn_partial<T, 1>(a, part, stream); break;
    case 2: st = launch_attn_partial<T, 2>(a, part, stream); break;
    case 4: st = launch_attn_partial<T, 4>(a, part, stream); break;
    case 8: st = launch_attn_partial<T, 8>(a, part, stream); break;
    case 16: st = launch_attn_partial<T, 16>(a, part, stream); break;
    case 32: st = launch_attn_partial<T, 32>(a, part, stream); break;
    default: break;
  }
  if (st != ADAFUSE_OK) return st;
  const int nsplit = attn_nsplit(a.max_seq, D, static_cast<int>(sizeof(T)));
  const int groups = kCombineThreads / D > 0 ? kCombineThreads / D : 1;
  const size_t smem = sizeof(float) * (static_cast<size_t>(nsplit) + static_cast<size_t>(groups) * D);
  if (smem > 48 * 1024) AF_CUDA_TRY(cudaFuncSetAttribute(attn_combine_kernel<T>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         static_cast<int>(smem)));
  Pdl pdl;
  st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  return launch_ex(attn_combine_kernel<T>, dim3(static_cast<unsigned>(a.tokens) * a.H), kCombineThreads, smem, pdl,
                   stream, D, nsplit, static_cast<const float*>(part), static_cast<T*>(a.out));
}

// One block per (query tile of bq rows, head, sequence).
template <typename T, typename K>
int launch_prefill_kernel(K kernel, size_t smem, int bq, int threads, const AttnCall& a, int max_seq_tokens,
                          cudaStream_t stream) {
  if (smem > 48 * 1024) AF_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         static_cast<int>(smem)));
  Pdl pdl;
  const int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  const dim3 grid(static_cast<unsigned>((max_seq_tokens + bq - 1) / bq), static_cast<unsigned>(a.H),
                  static_cast<unsigned>(a.seqs));
  return launch_ex(kernel, grid, threads, smem, pdl, stream, a.H, a.KV, a.max_seq, static_cast<const T*>(a.q),
                   static_cast<const T*>(a.kc), static_cast<const T*>(a.vc), a.seq_starts, a.seq_slots, a.positions,
                   a.window, a.scale, a.softcap, static_cast<T*>(a.out));
}

// bfloat16 / float16 with D a multiple of 16: the tensor-core kernel; float32 and D = 8: the SIMT one.
template <typename T, int D>
int launch_prefill(const AttnCall& a, int max_seq_tokens, cudaStream_t stream) {
  if constexpr (tc_prefill_covers<T, D>())
    return launch_prefill_kernel<T>(prefill_attn_mma_kernel<T, D>, TcTile<D>::smem, kTcBQ, kTcThreads, a,
                                    max_seq_tokens, stream);
  else
    return launch_prefill_kernel<T>(prefill_attn_kernel<T, D>, prefill_smem(D), kPrefillBQ, kPrefillThreads, a,
                                    max_seq_tokens, stream);
}

template <typename T>
int run_prefill_attention(const AttnCall& a, int D, int max_seq_tokens, cudaStream_t stream) {
  constexpr int V = TypeOps<T>::kVec;
  switch (D / V) {
    case 1: return launch_prefill<T, V>(a, max_seq_tokens, stream);
    case 2: return launch_prefill<T, 2 * V>(a, max_seq_tokens, stream);
    case 4: return launch_prefill<T, 4 * V>(a, max_seq_tokens, stream);
    case 8: return launch_prefill<T, 8 * V>(a, max_seq_tokens, stream);
    case 16: return launch_prefill<T, 16 * V>(a, max_seq_tokens, stream);
    case 32: return launch_prefill<T, 32 * V>(a, max_seq_tokens, stream);
    default: return ADAFUSE_ERR_INVALID_ARGUMENT;
  }
}

bool attention_shape_ok(adafuse_dtype dtype, int H, int KV, int D) {
  if (!valid_dtype(dtype) || H <= 0 || KV <= 0 || H % KV != 0 || H / KV > kAttnMaxGroup || D <= 0) return false;
  const int V = 16 / elem_size(dtype);
  if (D % V != 0) return false;
  const int L = D / V;
  return L <= 32 && (L & (L - 1)) == 0;
}

bool valid_norm_kind(int kind) { return kind == ADAFUSE_NORM_RMS || kind == ADAFUSE_NORM_RMS_ONE_PLUS; }

}  // namespace
}  // namespace adafuse

using namespace adafuse;

extern "C" {

// ---- model operations of the native backend ------------------------------------------

int adafuse_embed(adafuse_dtype dtype, int tokens, int hidden, long long vocab, const int64_t* ids, const void* table,
                  float scale, void* out, cudaStream_t stream) {
  if (!valid_dtype(dtype) || tokens < 0 || hidden <= 0 || vocab <= 0 || !ids || !table || !out ||
      !isfinite(scale))
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (tokens == 0) return ADAFUSE_OK;
  Pdl pdl;
  const int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  const int threads = hidden >= kElementThreads ? kElementThreads : (hidden + 31) / 32 * 32;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_ex(embed_kernel<T>, dim3(static_cast<unsigned>(tokens)), threads, 0, pdl, stream, hidden, vocab,
                     ids, static_cast<const T*>(table), scale, static_cast<T*>(out));
  });
}

int adafuse_norm(adafuse_dtype dtype, adafuse_norm_kind kind, int rows, int hidden, void* h, long long ldh,
                 const void* delta, long long ld_delta, const void* weight, float eps, void* out, long long ldo,
                 cudaStream_t stream) {
  if (!valid_dtype(dtype) || !valid_norm_kind(kind) || rows < 0 || hidden <= 0 || !h || !weight || !out ||
      !(eps >= 0.f) || ldh < hidden || ldo < hidden || (delta && ld_delta < hidden) || (delta && out == h))
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return ADAFUSE_OK;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_norm<T>(kind, rows, 1, hidden, h, ldh, delta, ld_delta, weight, eps, out, ldo, stream);
  });
}

int adafuse_head_norm(adafuse_dtype dtype, adafuse_norm_kind kind, int tokens, int heads, int head_dim, void* x,
                      long long ld, const void* weight, float eps, cudaStream_t stream) {
  if (!valid_dtype(dtype) || !valid_norm_kind(kind) || tokens < 0 || heads <= 0 || head_dim <= 0 || !x || !weight ||
      !(eps >= 0.f) || ld < static_cast<long long>(heads) * head_dim ||
      static_cast<long long>(tokens) * heads > 0x7fffffffLL)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (tokens == 0) return ADAFUSE_OK;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_norm<T>(kind, tokens, heads, head_dim, x, ld, nullptr, 0, weight, eps, x, ld, stream);
  });
}

int adafuse_act_mul(adafuse_dtype dtype, adafuse_activation act, int rows, int inter, const void* gate,
                    const void* up, long long ld, void* out, cudaStream_t stream) {
  if (!valid_dtype(dtype) || (act != ADAFUSE_ACT_SILU && act != ADAFUSE_ACT_GELU_TANH) || rows < 0 || inter <= 0 ||
      ld < inter || !gate || !up || !out)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  return launch_act_mul(dtype, act, rows, inter, gate, up, ld, out, stream);
}

int adafuse_rope_cache_write(adafuse_dtype dtype, int tokens, int num_heads, int num_kv_heads, int head_dim,
                             int rotary_dim, const void* q, long long ldq, const void* k, long long ldk,
                             const void* v, long long ldv, const float* inv_freq, const float* long_inv_freq,
                             const uint8_t* use_long, float attention_factor, const int32_t* slots,
                             const int64_t* positions, void* q_out, void* k_cache, void* v_cache, int max_seq,
                             cudaStream_t stream) {
  if (!valid_dtype(dtype) || tokens < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || rotary_dim <= 0 ||
      rotary_dim % 2 != 0 || rotary_dim > head_dim || max_seq <= 0 ||
      ldq < static_cast<long long>(num_heads) * head_dim || ldk < static_cast<long long>(num_kv_heads) * head_dim ||
      ldv < static_cast<long long>(num_kv_heads) * head_dim || !q || !k || !v || !inv_freq || !slots ||
      !positions || !q_out || !k_cache || !v_cache || !isfinite(attention_factor))
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const RopeArgs<T> a{num_heads, num_kv_heads, head_dim, rotary_dim,
                        static_cast<const T*>(q), ldq, static_cast<const T*>(k), ldk, static_cast<const T*>(v), ldv,
                        nullptr, nullptr, inv_freq, long_inv_freq, use_long, attention_factor, slots, 1, positions,
                        static_cast<T*>(q_out), static_cast<T*>(k_cache), static_cast<T*>(v_cache), max_seq};
    return launch_rope<T>(tokens, a, stream);
  });
}

size_t adafuse_attention_workspace_size(int tokens, int num_seqs, int num_heads, int head_dim, int max_seq) {
  if (tokens <= 0 || num_seqs <= 0 || num_heads <= 0 || head_dim <= 0 || max_seq <= 0) return 0;
  return attn_partials_bytes(tokens, num_heads, head_dim, max_seq);
}

int adafuse_attention(adafuse_dtype dtype, int tokens, int num_seqs, int max_seq_tokens, int num_heads,
                      int num_kv_heads, int head_dim, int max_seq, const void* q, const void* k_cache,
                      const void* v_cache, const int32_t* seq_starts, const int32_t* seq_slots,
                      const int64_t* positions, int window, float scale, float softcap, void* out, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) {
  if (!attention_shape_ok(dtype, num_heads, num_kv_heads, head_dim) || tokens < 0 || num_seqs < 0 ||
      max_seq_tokens < 1 || max_seq <= 0 || !q || !k_cache || !v_cache || !seq_starts || !seq_slots || !positions ||
      !out || !(scale > 0.f) || !(softcap >= 0.f) || !isfinite(scale) || !isfinite(softcap) ||
      (max_seq_tokens == 1 && tokens > num_seqs) || static_cast<long long>(tokens) * num_heads > 0x7fffffffLL ||
      num_seqs > 65535 || num_heads > 65535 ||
      static_cast<long long>(num_seqs) * num_kv_heads * attn_nsplit(max_seq, head_dim, 4) > 0x7fffffffLL)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (tokens == 0 || num_seqs == 0) return ADAFUSE_OK;
  if (!aligned16(q) || !aligned16(k_cache) || !aligned16(v_cache)) return ADAFUSE_ERR_INVALID_ARGUMENT;
  const AttnCall a{num_seqs, tokens, num_heads, num_kv_heads, max_seq, q, k_cache, v_cache, seq_starts, seq_slots,
                   positions, window, scale, softcap, out};
  if (max_seq_tokens == 1) {
    if (!workspace || workspace_bytes < attn_partials_bytes(tokens, num_heads, head_dim, max_seq))
      return ADAFUSE_ERR_WORKSPACE;
    return by_dtype(dtype, [&](auto tag) {
      return run_decode_attention<decltype(tag)>(a, head_dim, static_cast<float*>(workspace), stream);
    });
  }
  return by_dtype(dtype, [&](auto tag) {
    return run_prefill_attention<decltype(tag)>(a, head_dim, max_seq_tokens, stream);
  });
}

int adafuse_gather_rows(adafuse_dtype dtype, int rows, int cols, const void* src, long long ld_src,
                        const int32_t* index, void* dst, long long ld_dst, cudaStream_t stream) {
  if (!valid_dtype(dtype) || rows < 0 || cols <= 0 || ld_src < cols || ld_dst < cols || !src || !index || !dst)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return ADAFUSE_OK;
  Pdl pdl;
  const int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  const int threads = cols >= kElementThreads ? kElementThreads : (cols + 31) / 32 * 32;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_ex(gather_rows_kernel<T>, dim3(static_cast<unsigned>(rows)), threads, 0, pdl, stream, cols,
                     static_cast<const T*>(src), ld_src, index, static_cast<T*>(dst), ld_dst);
  });
}

int adafuse_logits_to_float(adafuse_dtype dtype, int rows, long long vocab, const void* in, long long ld_in,
                            float softcap, float* out, cudaStream_t stream) {
  if (!valid_dtype(dtype) || rows < 0 || vocab <= 0 || ld_in < vocab || !in || !out || !(softcap >= 0.f) ||
      !isfinite(softcap))
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  const long long total = static_cast<long long>(rows) * vocab;
  if (total == 0) return ADAFUSE_OK;
  unsigned blocks;
  int st = element_blocks(total, &blocks);
  if (st != ADAFUSE_OK) return st;
  Pdl pdl;
  st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_ex(logits_kernel<T>, dim3(blocks), kElementThreads, 0, pdl, stream, total, vocab,
                     static_cast<const T*>(in), ld_in, softcap, out);
  });
}

int adafuse_route_topk(adafuse_dtype dtype, int rows, int in_features, const void* x, long long ldx,
                       const float* weight, const float* bias, int experts, int top_k, int normalize, int32_t* ids,
                       float* gates, cudaStream_t stream) {
  if (!valid_dtype(dtype) || rows < 0 || in_features <= 0 || ldx < in_features || !x || !weight || experts <= 0 ||
      experts > ADAFUSE_LORA_MAX_EXPERTS || top_k <= 0 || top_k > ADAFUSE_MAX_TOP_K || top_k > experts || !ids ||
      !gates)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return ADAFUSE_OK;
  Pdl pdl;
  const int st = stream_pdl(stream, &pdl);
  if (st != ADAFUSE_OK) return st;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_ex(route_topk_kernel<T>, dim3(static_cast<unsigned>(rows)), kRouteThreads, 0, pdl, stream,
                     in_features, static_cast<const T*>(x), ldx, weight, bias, experts, top_k, normalize, ids, gates);
  });
}

// ---- decode-step operations (special cases of the model operations above) ----------------

int adafuse_add_rms_norm(adafuse_dtype dtype, int rows, int hidden, void* h, const void* delta,
                         const void* weight, float eps, void* out, cudaStream_t stream) {
  if (!valid_dtype(dtype) || rows < 0 || hidden <= 0 || !h || !weight || !out || !(eps >= 0.f))
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return ADAFUSE_OK;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_norm<T>(ADAFUSE_NORM_RMS, rows, 1, hidden, h, hidden, delta, hidden, weight, eps, out, hidden,
                          stream);
  });
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
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const RopeArgs<T> a{num_heads, num_kv_heads, head_dim, head_dim,
                        static_cast<const T*>(q), ldq, static_cast<const T*>(k), ldk, static_cast<const T*>(v), ldv,
                        static_cast<const T*>(cos), static_cast<const T*>(sin), nullptr, nullptr, nullptr, 1.f,
                        nullptr, seq, positions,
                        static_cast<T*>(q_out), static_cast<T*>(k_cache), static_cast<T*>(v_cache), max_seq};
    return launch_rope<T>(static_cast<long long>(batch) * seq, a, stream);
  });
}

int adafuse_silu_mul(adafuse_dtype dtype, int rows, int inter, const void* gate, const void* up, long long ld,
                     void* out, cudaStream_t stream) {
  return adafuse_act_mul(dtype, ADAFUSE_ACT_SILU, rows, inter, gate, up, ld, out, stream);
}

size_t adafuse_decode_attention_workspace_size(int batch, int num_heads, int head_dim, int max_seq) {
  if (batch <= 0 || num_heads <= 0 || head_dim <= 0 || max_seq <= 0) return 0;
  return attn_partials_bytes(batch, num_heads, head_dim, max_seq);
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
  const AttnCall a{batch, batch, num_heads, num_kv_heads, max_seq, q, k_cache, v_cache, nullptr, nullptr,
                   positions, window, scale, 0.f, out};
  return by_dtype(dtype, [&](auto tag) {
    return run_decode_attention<decltype(tag)>(a, head_dim, static_cast<float*>(workspace), stream);
  });
}

}  // extern "C"
