// lora_linear.cu - routed fused linear:
//   y[n] = W x[n] (+ bias) + scale * sum_j gates[n,j] * B[e] (A[e] x[n]).
//
// Few rows (rows <= kGemvMaxRows), the decode case, two kernels; the GEMV is a programmatic
// dependent (PDL, sm_90) of the shrink, the shrink one of the kernel before it where the caller's
// workspace is exclusive (adafuse_lora_options):
//   1. shrink_dot: t[n,j,r] = scale * g[n,j] * A[e][r,:] . x[n] into the fp32 workspace, one
//      block per (n, j, r): about one memory round trip. Once the previous kernel has
//      completed it raises a flag (x_ready) in the workspace.
//   2. the GEMV, launched while the shrink runs: from x_ready on it streams W x (one row:
//      gemv1, several 16-byte loads in flight per lane, x staged in shared memory; 2-16 rows:
//      gemv_mma on tensor cores; else the SIMT gemv_lora), then waits for the shrink
//      (griddepcontrol.wait) and adds sum_j B[e][o,:] . t[n,j,:] before writing y.
// Many rows, the prefill case: the LoRA term becomes extra K columns of one
// tensor-core GEMM, y = [x | z] [W | B_cat]^T + bias (see "Many-rows path" below):
//   1. shrink: x A_cat^T for all experts (A as [E*rank, in]), split over K, fp32 partials;
//   2. zscale: z = scale * gate * (sum of partials), zero for the experts a row does not use;
//   3. gemm: mma.sync tensor cores (fp16/bf16; a SIMT tile for fp32), 4-stage cp.async,
//      split over K (plus a reduce) at <= 64 rows.
// Expert ids outside [0, num_experts) contribute nothing (no device trap).
// A == B == nullptr: no adapter, y = W x (+ bias): the few-rows kernels, or at many rows the final
// GEMM alone with K = in (the dense projections and the LM head of the native backend's prefill).
#include "common.cuh"

#include <algorithm>
#include <atomic>
#include <type_traits>

namespace adafuse {
namespace {

constexpr int kGemvMaxRows = 16;
constexpr int kThreads = 256;
constexpr int kMaxExperts = ADAFUSE_LORA_MAX_EXPERTS;
constexpr int kMaxRank = ADAFUSE_LORA_MAX_RANK;
constexpr int kMaxTopK = ADAFUSE_MAX_TOP_K;
// ADAFUSE_LORA_MAX_ROWS must fit the many-rows GEMMs' grid rows (64-row tiles at the smallest).
static_assert((ADAFUSE_LORA_MAX_ROWS + 63) / 64 <= 65535, "ADAFUSE_LORA_MAX_ROWS exceeds the GEMM grid");
// E * rank (the shrink's columns, z's width) fits an int.
static_assert(static_cast<long long>(ADAFUSE_LORA_MAX_EXPERTS) * ADAFUSE_LORA_MAX_RANK < (1ll << 30),
              "E * rank overflows");

// ---------------------------------------------------------------------------
// Few-rows path
// ---------------------------------------------------------------------------

// t[slot, r] = scale * g[slot] * A[e] x[n]: one block per (slot, r), its threads split `in`
// (one round of 16-byte loads for in <= 8192 bf16), so the shrink costs about one memory
// round trip. x, ids and gates come from earlier kernels.
// x_ready (the GEMV's start signal): block 0 sets it to 0 before letting the GEMV launch and
// to 1 once the previous kernel has completed (after griddepcontrol.wait), so the GEMV can
// stream W x while the shrink still runs and wait for t only before its LoRA epilogue. The
// first store comes before griddepcontrol.wait: launched as a programmatic dependent, the shrink
// writes x_ready while the previous kernel may still run, so run_few_rows launches it so only
// into an exclusive workspace (adafuse_lora_options::exclusive_workspace), else in stream order,
// where griddepcontrol.wait returns at once.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
shrink_dot_kernel(int in, int E, int rank, int top_k, const T* __restrict__ x,
                  const T* __restrict__ A, const int32_t* __restrict__ ids,
                  const float* __restrict__ gates, float scale, float* __restrict__ t,
                  unsigned* __restrict__ x_ready) {
  __shared__ float red[kThreads / 32];
  const bool signal = blockIdx.x == 0 && threadIdx.x == 0;
  if (signal) {
    *x_ready = 0u;
    __threadfence();
  }
  pdl_launch_dependents();  // the GEMV may launch now
  const int slot = static_cast<int>(blockIdx.x / static_cast<unsigned>(rank));
  const int r = static_cast<int>(blockIdx.x % static_cast<unsigned>(rank));
  const int n = slot / top_k;
  pdl_wait();
  if (signal) st_release(x_ready, 1u);  // the previous kernel is complete: x is final
  const int e = ids[slot];
  if (e < 0 || e >= E) {
    if (threadIdx.x == 0) t[blockIdx.x] = 0.f;
    return;
  }
  const T* a = A + (static_cast<size_t>(e) * rank + r) * in;
  const T* xr = x + static_cast<size_t>(n) * in;
  float acc = 0.f;
  if (VEC) {
    constexpr int V = TypeOps<T>::kVec, U = 4;
    const int nv = in / V;
    for (int v0 = threadIdx.x; v0 < nv; v0 += kThreads * U) {
      uint4 av[U], xv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + kThreads * u;
        const bool ok = v < nv;
        av[u] = ok ? __ldg(reinterpret_cast<const uint4*>(a) + v) : make_uint4(0, 0, 0, 0);
        xv[u] = ok ? __ldg(reinterpret_cast<const uint4*>(xr) + v) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float af[V], xf[V];
        unpack16<T>(av[u], af);
        unpack16<T>(xv[u], xf);
#pragma unroll
        for (int q = 0; q < V; ++q) acc = fmaf(af[q], xf[q], acc);
      }
    }
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < in; i += kThreads) acc = fmaf(ldf(a + i), ldf(xr + i), acc);
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[w];
    t[blockIdx.x] = scale * gates[slot] * s;
  }
}

// The same t with one warp per (slot, r): 8 dots per block. Faster than the block-per-dot shrink
// at 2-16 rows (ADAFUSE_SHRINK_AUTO); launched after the previous kernel completes (no x_ready).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
shrink_warp_kernel(int rows, int in, int E, int rank, int top_k, const T* __restrict__ x,
                   const T* __restrict__ A, const int32_t* __restrict__ ids,
                   const float* __restrict__ gates, float scale, float* __restrict__ t) {
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const long long w = (static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const long long total = static_cast<long long>(rows) * top_k * rank;
  if (w >= total) return;
  const int r = static_cast<int>(w % rank);
  const int slot = static_cast<int>(w / rank);
  const int n = slot / top_k;
  const int e = ids[slot];
  if (e < 0 || e >= E) {
    if (lane == 0) t[w] = 0.f;
    return;
  }
  const T* a = A + (static_cast<size_t>(e) * rank + r) * in;
  const T* xr = x + static_cast<size_t>(n) * in;
  float acc = 0.f;
  if (VEC) {
    constexpr int V = TypeOps<T>::kVec;
    const int nv = in / V;
    for (int v0 = lane; v0 < nv; v0 += 32 * 4) {
      uint4 av[4], xv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int v = v0 + 32 * u;
        if (v < nv) {
          av[u] = __ldg(reinterpret_cast<const uint4*>(a) + v);
          xv[u] = __ldg(reinterpret_cast<const uint4*>(xr) + v);
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int v = v0 + 32 * u;
        if (v < nv) {
          float af[V], xf[V];
          unpack16<T>(av[u], af);
          unpack16<T>(xv[u], xf);
#pragma unroll
          for (int q = 0; q < V; ++q) acc = fmaf(af[q], xf[q], acc);
        }
      }
    }
  } else {
#pragma unroll 4
    for (int i = lane; i < in; i += 32) acc = fmaf(ldf(a + i), ldf(xr + i), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) t[w] = scale * gates[slot] * acc;
}

// Before reading x: with x_ready (a LoRA call) thread 0 waits for the shrink's signal (the
// shrink's blocks are all running once this grid has launched, so this cannot hang), then the
// block reads x through L2 only (ld.cg: no L1 line older than the signal); without (no adapter)
// griddepcontrol.wait on the previous kernel.
__device__ __forceinline__ void wait_x_ready(const unsigned* x_ready) {
  if (x_ready) {
    if (threadIdx.x == 0)
      while (ld_acquire(x_ready) != 1u) __nanosleep(64);
    __syncthreads();
  } else {
    pdl_wait();
  }
}

// One row (batch-1 decode), 16-byte W rows. KS warps share an output row (each a contiguous
// K slice, partials added through shared memory), each warp NO consecutive rows, U 16-byte W
// loads per row in flight per lane; x is staged once per block in shared memory. The LoRA
// term sum_j B[e][o,:] . t[j,:] is added after the W stream (t after griddepcontrol.wait); its
// B values, up to LR = 4 per lane and row, are loaded before the stream.
template <typename T, typename WT, int U, int NO, int KS>
__global__ void __launch_bounds__(kThreads)
gemv1_kernel(int in, int out, const T* __restrict__ x, const WT* __restrict__ W,
             const float* __restrict__ wscale, const T* __restrict__ bias, const T* __restrict__ B, int E, int rank,
             const int32_t* __restrict__ ids, int top_k, const float* __restrict__ t,
             T* __restrict__ y, const unsigned* __restrict__ x_ready) {
  // A 16-byte W load holds WE elements (V of T, 16 of FP8), matched by XR 16-byte x vectors.
  constexpr int V = TypeOps<T>::kVec, WE = WeightOps<T, WT>::kElems, XR = WE / V, LR = 4, kWarps = kThreads / 32;
  extern __shared__ uint4 xs[];  // [in / V]
  __shared__ float part[kWarps][NO];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nv = in / V, nw = in / WE;
  wait_x_ready(x_ready);
  for (int i = threadIdx.x; i < nv; i += kThreads) xs[i] = ld_cg16(reinterpret_cast<const uint4*>(x) + i);
  __syncthreads();

  const int ks = warp % KS;  // this warp's K slice
  const long long o0 = (static_cast<long long>(blockIdx.x) * (kWarps / KS) + warp / KS) * NO;
  const int per = (nw + KS - 1) / KS;
  const int vb = ks * per, ve = min(nw, vb + per);
  // LoRA operands that the shrink does not produce (ids, B rows) are loaded into registers now,
  // so their latency hides under the W stream; t after griddepcontrol.wait. Pair i = (j, r) over
  // the row's KS warps and lanes; with more than 32 * KS * LR pairs, all after the stream.
  const int pairs = t ? top_k * rank : 0;
  const bool pre = pairs <= 32 * KS * LR;
  float bp[NO][LR];
#pragma unroll
  for (int m = 0; m < LR; ++m) {
    const int i = ks * 32 + lane + 32 * KS * m;
#pragma unroll
    for (int q = 0; q < NO; ++q) bp[q][m] = 0.f;
    if (pre && i < pairs) {
      const int j = i / rank, r = i - j * rank;
      const int e = __ldcg(ids + j);  // L2: written by an earlier kernel (see wait_x_ready)
      if (e >= 0 && e < E) {
#pragma unroll
        for (int q = 0; q < NO; ++q)
          if (o0 + q < out) bp[q][m] = ldf(B + (static_cast<size_t>(e) * out + (o0 + q)) * rank + r);
      }
    }
  }

  float acc[NO], wsc[NO];
  const uint4* Wv[NO];
#pragma unroll
  for (int q = 0; q < NO; ++q) {
    acc[q] = 0.f;
    const long long o = (o0 + q < out) ? o0 + q : (out - 1);  // clamp: duplicate row, discarded
    Wv[q] = reinterpret_cast<const uint4*>(W + static_cast<size_t>(o) * in);
    wsc[q] = kIsFp8<WT> ? __ldg(wscale + o) : 1.f;
  }
  // Full rounds with unconditional loads (a bounds check per load becomes a branch per load,
  // and ptxas then sinks the loads to their uses: one in flight), then single-load rounds.
  int v0 = vb + lane;
  for (; v0 + 32 * (U - 1) < ve; v0 += 32 * U) {
    uint4 wv[NO][U];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int q = 0; q < NO; ++q) wv[q][u] = ld_stream16(Wv[q] + v0 + 32 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float xf[WE];
#pragma unroll
      for (int h = 0; h < XR; ++h) unpack16<T>(xs[(v0 + 32 * u) * XR + h], xf + h * V);
#pragma unroll
      for (int q = 0; q < NO; ++q) {
        float wf[WE];
        WeightOps<T, WT>::unpack(wv[q][u], wf);
#pragma unroll
        for (int k = 0; k < WE; ++k) acc[q] = fmaf(wf[k], xf[k], acc[q]);
      }
    }
  }
  for (; v0 < ve; v0 += 32) {
    float xf[WE];
#pragma unroll
    for (int h = 0; h < XR; ++h) unpack16<T>(xs[v0 * XR + h], xf + h * V);
#pragma unroll
    for (int q = 0; q < NO; ++q) {
      float wf[WE];
      WeightOps<T, WT>::unpack(ld_stream16(Wv[q] + v0), wf);
#pragma unroll
      for (int k = 0; k < WE; ++k) acc[q] = fmaf(wf[k], xf[k], acc[q]);
    }
  }
  pdl_launch_dependents();  // only the epilogue is left: let the next kernel launch
#pragma unroll
  for (int q = 0; q < NO; ++q) acc[q] = warp_sum(acc[q]) * wsc[q];  // FP8: the channel's scale

  // LoRA term, split over the row's KS warps: pair i = (j, r) over lanes and warps
  if (t) {
    if (x_ready) pdl_wait();  // t comes from the shrink
    float lo[NO];
#pragma unroll
    for (int q = 0; q < NO; ++q) lo[q] = 0.f;
    if (pre) {
#pragma unroll
      for (int m = 0; m < LR; ++m) {
        const int i = ks * 32 + lane + 32 * KS * m;
        const float tv = i < pairs ? t[i] : 0.f;
#pragma unroll
        for (int q = 0; q < NO; ++q) lo[q] = fmaf(bp[q][m], tv, lo[q]);
      }
    }
    for (int i0 = ks * 32 + lane; !pre && i0 < pairs; i0 += 32 * KS * LR) {
      float tl[LR], bl[NO][LR];
#pragma unroll
      for (int m = 0; m < LR; ++m) {  // loads first, all in flight
        const int i = i0 + 32 * KS * m;
        tl[m] = 0.f;
#pragma unroll
        for (int q = 0; q < NO; ++q) bl[q][m] = 0.f;
        if (i < pairs) {
          const int j = i / rank, r = i - j * rank;
          const int e = ids[j];
          if (e >= 0 && e < E) {
            tl[m] = t[i];
#pragma unroll
            for (int q = 0; q < NO; ++q)
              if (o0 + q < out) bl[q][m] = ldf(B + (static_cast<size_t>(e) * out + (o0 + q)) * rank + r);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < LR; ++m)
#pragma unroll
        for (int q = 0; q < NO; ++q) lo[q] = fmaf(bl[q][m], tl[m], lo[q]);
    }
#pragma unroll
    for (int q = 0; q < NO; ++q) acc[q] += warp_sum(lo[q]);
  }
  if (KS > 1) {
    if (lane == 0)
#pragma unroll
      for (int q = 0; q < NO; ++q) part[warp][q] = acc[q];
    __syncthreads();
    if (ks != 0) return;
#pragma unroll
    for (int q = 0; q < NO; ++q)
#pragma unroll
      for (int s2 = 1; s2 < KS; ++s2) acc[q] += part[warp + s2][q];
  }
#pragma unroll
  for (int q = 0; q < NO; ++q) {
    if (lane == q && o0 + q < out) {
      float v = acc[q];
      if (bias) v += ldf(bias + o0 + q);
      y[o0 + q] = TypeOps<T>::from_f(v);
    }
  }
}

// One warp per NO consecutive output rows; R = max rows handled (rows <= R).
template <typename T, typename WT, int R, int NO, bool VEC>
__global__ void __launch_bounds__(kThreads)
gemv_lora_kernel(int rows, int in, int out, const T* __restrict__ x, const WT* __restrict__ W,
                 const float* __restrict__ wscale, const T* __restrict__ bias, const T* __restrict__ B, int E, int rank,
                 const int32_t* __restrict__ ids, int top_k, const float* __restrict__ t,
                 T* __restrict__ y) {
  constexpr int U = 4 / NO;  // 16-byte W loads in flight per lane = NO * U = 4 (8 measured slower at one row)
  const int lane = threadIdx.x & 31;
  const long long wg = (static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const long long o0 = wg * NO;
  pdl_wait();  // x may come from the kernel before the shrink (a programmatic dependent too)
  if (o0 >= out) return;

  float acc[NO][R];
#pragma unroll
  for (int q = 0; q < NO; ++q)
#pragma unroll
    for (int n = 0; n < R; ++n) acc[q][n] = 0.f;

  if constexpr (VEC) {
    // A 16-byte W load holds WE elements (V of T, 16 of FP8), matched by XR 16-byte x vectors.
    constexpr int V = TypeOps<T>::kVec, WE = WeightOps<T, WT>::kElems, XR = WE / V;
    const int nv = in / WE;
    const uint4* Wv[NO];
#pragma unroll
    for (int q = 0; q < NO; ++q) {
      const long long o = (o0 + q < out) ? o0 + q : o0;  // clamp: duplicate row, discarded
      Wv[q] = reinterpret_cast<const uint4*>(W + static_cast<size_t>(o) * in);
    }
    for (int v0 = lane; v0 < nv; v0 += 32 * U) {
      uint4 wv[NO][U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + 32 * u;
#pragma unroll
        for (int q = 0; q < NO; ++q)
          wv[q][u] = (v < nv) ? ld_stream16(Wv[q] + v) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + 32 * u;
        if (v < nv) {
          float wf[NO][WE];
#pragma unroll
          for (int q = 0; q < NO; ++q) WeightOps<T, WT>::unpack(wv[q][u], wf[q]);
#pragma unroll
          for (int n = 0; n < R; ++n) {
            if (n < rows) {
              float xf[WE];
              const uint4* xv = reinterpret_cast<const uint4*>(x + static_cast<size_t>(n) * in) + v * XR;
#pragma unroll
              for (int h = 0; h < XR; ++h) unpack16<T>(__ldg(xv + h), xf + h * V);
#pragma unroll
              for (int q = 0; q < NO; ++q)
#pragma unroll
                for (int k = 0; k < WE; ++k) acc[q][n] = fmaf(wf[q][k], xf[k], acc[q][n]);
            }
          }
        }
      }
    }
    if constexpr (kIsFp8<WT>) {  // the channel's scale, before the LoRA term joins acc
#pragma unroll
      for (int q = 0; q < NO; ++q) {
        const float sc = __ldg(wscale + ((o0 + q < out) ? o0 + q : o0));
#pragma unroll
        for (int n = 0; n < R; ++n) acc[q][n] *= sc;
      }
    }
  } else {  // W of T only (FP8 needs 16-byte rows)
#pragma unroll 2
    for (int i = lane; i < in; i += 32) {
      float wf[NO];
#pragma unroll
      for (int q = 0; q < NO; ++q) {
        const long long o = (o0 + q < out) ? o0 + q : o0;
        wf[q] = ldf(W + static_cast<size_t>(o) * in + i);
      }
#pragma unroll
      for (int n = 0; n < R; ++n) {
        if (n < rows) {
          const float xv = ldf(x + static_cast<size_t>(n) * in + i);
#pragma unroll
          for (int q = 0; q < NO; ++q) acc[q][n] = fmaf(wf[q], xv, acc[q][n]);
        }
      }
    }
  }

  // LoRA epilogue (t from the shrink kernel, complete after the wait above)
#pragma unroll
  for (int n = 0; n < R; ++n) {
    if (n < rows && t) {
      for (int j = 0; j < top_k; ++j) {
        const int slot = n * top_k + j;
        const int e = ids[slot];
        if (e < 0 || e >= E) continue;
        const float* ts = t + static_cast<size_t>(slot) * rank;
#pragma unroll
        for (int q = 0; q < NO; ++q) {
          if (o0 + q < out) {
            const T* b = B + (static_cast<size_t>(e) * out + (o0 + q)) * rank;
            for (int r = lane; r < rank; r += 32) acc[q][n] = fmaf(ldf(b + r), ts[r], acc[q][n]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < NO; ++q) {
#pragma unroll
    for (int n = 0; n < R; ++n) {
      const float s = warp_sum(acc[q][n]);
      if (lane == ((q * R + n) & 31) && n < rows && o0 + q < out) {
        float v = s;
        if (bias) v += ldf(bias + o0 + q);
        y[static_cast<size_t>(n) * out + o0 + q] = TypeOps<T>::from_f(v);
      }
    }
  }
}


// Few rows (2..16) on tensor cores: y^T[out, rows] = W[out, in] x^T[in, rows].
// One block = 16 output rows, its 8 warps split K. Each lane loads 16 bytes of
// two W rows and 16 bytes of x per 32-wide k chunk; the k order inside a chunk
// is permuted identically for W and x (a dot product does not care), so the
// fragments come straight from 16-byte loads with no shared memory.
template <typename T, typename WT, int NT>
__global__ void __launch_bounds__(kThreads)
gemv_mma_kernel(int rows, int in, int out, const T* __restrict__ x, const WT* __restrict__ W,
                const float* __restrict__ wscale, const T* __restrict__ bias, const T* __restrict__ B, int E, int rank,
                const int32_t* __restrict__ ids, int top_k, const float* __restrict__ t,
                T* __restrict__ y, bool vec_b, bool x_done) {
  // 32-wide k chunks in flight per warp: FP8 W comes in 8-byte loads, so twice as many keep the W bytes in
  // flight per lane (what the stream's bandwidth follows) those of the 16-byte loads of T.
  constexpr int U = kIsFp8<WT> ? 8 : 4;
  __shared__ float red[kThreads / 32][16][8 * NT + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c4 = lane & 3;
  const int o0 = blockIdx.x * 16;
  // x_done: the shrink before this kernel was launched after x was complete (the W x stream
  // overlaps the shrink; this kernel waits for t before its epilogue); else wait now.
  if (!x_done) pdl_wait();
  const int nchunks = in / 32 + ((in % 32) ? 1 : 0);
  const uint4 z = make_uint4(0, 0, 0, 0);
  const int oa = min(o0 + g, out - 1), ob = min(o0 + g + 8, out - 1);
  const bool va = o0 + g < out, vb = o0 + g + 8 < out;
  const WT* wa = W + static_cast<size_t>(oa) * in + 8 * c4;
  const WT* wb = W + static_cast<size_t>(ob) * in + 8 * c4;
  const T* xr[NT];
  bool xv[NT];
#pragma unroll
  for (int h = 0; h < NT; ++h) {
    const int n = g + 8 * h;
    xv[h] = n < rows;
    xr[h] = x + static_cast<size_t>(xv[h] ? n : 0) * in + 8 * c4;
  }
  float acc[NT][4];
#pragma unroll
  for (int h = 0; h < NT; ++h)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[h][q] = 0.f;

  // A lane's 8 W elements of a chunk: 16 bytes of T, or 8 bytes of FP8 converted to T in registers.
  using WRaw = typename std::conditional<kIsFp8<WT>, uint2, uint4>::type;
  auto ld_w = [](const WT* p) -> WRaw {
    if constexpr (kIsFp8<WT>) return ld_stream8(p); else return ld_stream16(p);
  };
  auto to_t = [](const WRaw& r) -> uint4 {
    if constexpr (kIsFp8<WT>) return fp8x8_to16<T>(r); else return r;
  };
  for (int c0 = warp; c0 < nchunks; c0 += (kThreads / 32) * U) {
    WRaw ra[U], rb[U];
    uint4 lx[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + (kThreads / 32) * u;
      const int k = c * 32 + 8 * c4;
      const bool kin = c < nchunks && k < in;
      ra[u] = (kin && va) ? ld_w(wa + c * 32) : WRaw{};
      rb[u] = (kin && vb) ? ld_w(wb + c * 32) : WRaw{};
#pragma unroll
      for (int h = 0; h < NT; ++h)
        lx[u][h] = (kin && xv[h]) ? __ldg(reinterpret_cast<const uint4*>(xr[h] + c * 32)) : z;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4 la = to_t(ra[u]), lb = to_t(rb[u]);
      const uint32_t a1[4] = {la.x, lb.x, la.y, lb.y};
      const uint32_t a2[4] = {la.z, lb.z, la.w, lb.w};
#pragma unroll
      for (int h = 0; h < NT; ++h) {
        const uint32_t b1[2] = {lx[u][h].x, lx[u][h].y};
        const uint32_t b2[2] = {lx[u][h].z, lx[u][h].w};
        Mma<T>::run(acc[h], a1, b1);
        Mma<T>::run(acc[h], a2, b2);
      }
    }
  }
  // c0,c1: (row g, n = 2*c4 + {0,1}), c2,c3: (row g+8, same n)
#pragma unroll
  for (int h = 0; h < NT; ++h) {
    red[warp][g][8 * h + 2 * c4] = acc[h][0];
    red[warp][g][8 * h + 2 * c4 + 1] = acc[h][1];
    red[warp][g + 8][8 * h + 2 * c4] = acc[h][2];
    red[warp][g + 8][8 * h + 2 * c4 + 1] = acc[h][3];
  }

  // Epilogue: a group of 4 lanes per (output ol, row n) pair adds the warps' partials and the
  // pair's LoRA term sum_j B[e][o,:] . t[slot,:]; the lanes split the rank with 16-byte B loads
  // (when rank allows) issued together, then 2 shuffles. One lane per pair walked the whole rank
  // serially (slow at large ranks); a warp per pair serialised a reduction per pair (slow at small).
  pdl_launch_dependents();
  __syncthreads();
  if (x_done) pdl_wait();  // t comes from the shrink
  const int q = tid & 3, gid = tid >> 2;
#pragma unroll
  for (int i = 0; i < 2 * NT; ++i) {  // 64 groups x 2NT = 16 outputs x 8NT rows
    const int p = gid + (kThreads / 4) * i;
    const int ol = p / (8 * NT), n = p % (8 * NT);
    const int o = o0 + ol;
    const bool live = o < out && n < rows;
    float v = 0.f;
    if (live && t) {
      for (int j = 0; j < top_k; ++j) {
        const int slot = n * top_k + j;
        const int e = ids[slot];
        if (e < 0 || e >= E) continue;
        const T* b = B + (static_cast<size_t>(e) * out + o) * rank;
        const float* ts = t + static_cast<size_t>(slot) * rank;
        if (vec_b) {
          constexpr int V = TypeOps<T>::kVec;
#pragma unroll 2
          for (int r = q * V; r < rank; r += 4 * V) {
            float bf[V];
            unpack16<T>(__ldg(reinterpret_cast<const uint4*>(b + r)), bf);
#pragma unroll
            for (int k = 0; k < V; k += 4) {
              const float4 tv = *reinterpret_cast<const float4*>(ts + r + k);
              v = fmaf(bf[k], tv.x, v);
              v = fmaf(bf[k + 1], tv.y, v);
              v = fmaf(bf[k + 2], tv.z, v);
              v = fmaf(bf[k + 3], tv.w, v);
            }
          }
        } else {
#pragma unroll 4
          for (int r = q; r < rank; r += 4) v = fmaf(ldf(b + r), ts[r], v);
        }
      }
    }
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    if (live && q == 0) {
      float d = 0.f;  // W x
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) d += red[w][ol][n];
      if constexpr (kIsFp8<WT>) d *= __ldg(wscale + o);
      v += d;
      if (bias) v += ldf(bias + o);
      y[static_cast<size_t>(n) * out + o] = TypeOps<T>::from_f(v);
    }
  }
}

// ---------------------------------------------------------------------------
// Many-rows path: the LoRA term as extra K columns of one tensor-core GEMM.
//   c[n,e]          = scale * sum_{j: ids[n,j] = e} gates[n,j]  (0 for experts row n does not use)
//   z[n, e*rank+q]  = c[n,e] * (A[e] x[n])[q]                  (A_cat = A as [E*rank, in])
//   y               = [x | z] [W | B_cat]^T + bias,             B_cat[o, e*rank+q] = B[e, o, q]
// y is accumulated in fp32 and rounded once; no atomics. The shrink computes every expert for
// every row (the unused columns get c = 0): 2*rows*E*rank*(in+out) flops over the dense
// 2*rows*in*out (6% at E8 r16 on 4096x4096), in exchange for dense tensor-core tiles.
//   1. gemm, partial mode: P[s] = x A_cat^T over the s-th split of K = in (fp32);
//   2. zscale: z = T(c * sum_s P[s]);
//   3. gemm, final mode, over K = in + E*rank: 128 x 128 tiles; at <= 64 rows (one row of
//      tiles, too few blocks to stream W at full bandwidth) split over K in partial mode
//      instead, then y = T(sum of partials + bias).
// zscale and the final GEMM are programmatic dependent launches (sm_90): the final GEMM streams
// x W^T while the shrink runs and waits (griddepcontrol.wait) only before its first z slice.
// Measured on an H200 (benchmarks/results/KERNEL_NOTES.md, v5): 3.8-4.3x cuBLAS's dense x W^T
// at 512-2048 rows, 1.8-2.9x at 17-64 rows. The common bound of every tile and pipeline depth
// tried (and of a wgmma version) is the cp.async operand stream, not the MMAs.
// ---------------------------------------------------------------------------

template <typename T>
struct GemmArgs {
  int M, N;       // rows, output columns
  const T* X;     // segment 1: X [M, K1]
  const T* W;     //            W [N, K1]
  const __nv_fp8_e4m3* Wq;  // or W as FP8 (gemm_tc_kernel's W8), scaled per column by wscale [N]
  const float* wscale;
  int K1;
  const T* Z;     // segment 2: Z [M, ldz] (first K2 columns)
  const T* B;     //            B [K2 / rank, N, rank]
  int K2, rank, ldz;
  const T* bias;  // final mode: [N] or null
  T* Y;           // final mode: [M, N]
  float* P;       // partial mode: [splits, M, N] fp32
  int tps;        // partial mode: split s = blockIdx.z covers K tiles [s*tps, (s+1)*tps) (kGemmBK
                  // wide) of the K1 tiles followed by the K2 tiles; fp32: K1 only
  bool vec1, vec2;  // 16-byte loads for segment 1 / 2
  bool pairs;       // final mode: 4-byte stores of two outputs
  bool m_fast;      // M tiles on grid x (see tile_m)
};

template <typename T>
__device__ __forceinline__ const T* seg_x(const GemmArgs<T>& a, bool seg1, int m, int k) {
  return seg1 ? a.X + static_cast<size_t>(m) * a.K1 + k : a.Z + static_cast<size_t>(m) * a.ldz + k;
}
template <typename T>
__device__ __forceinline__ const T* seg_w(const GemmArgs<T>& a, bool seg1, int o, int k) {
  return seg1 ? a.W + static_cast<size_t>(o) * a.K1 + k
              : a.B + (static_cast<size_t>(k / a.rank) * a.N + o) * a.rank + k % a.rank;
}

__device__ __forceinline__ void store_pair(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// One output element pair (o, o+1) of row m: partial sums to P, or bias + rounding to Y.
template <typename T, bool PARTIAL>
__device__ __forceinline__ void gemm_store(const GemmArgs<T>& a, int m, int o, float v0, float v1) {
  if (m >= a.M || o >= a.N) return;
  const bool two = o + 1 < a.N;
  if (PARTIAL) {
    float* p = a.P + (static_cast<size_t>(blockIdx.z) * a.M + m) * a.N + o;
    p[0] = v0;
    if (two) p[1] = v1;
    return;
  }
  if (a.bias) {
    v0 += ldf(a.bias + o);
    if (two) v1 += ldf(a.bias + o + 1);
  }
  T* yp = a.Y + static_cast<size_t>(m) * a.N + o;
  if constexpr (!std::is_same<T, float>::value) {
    if (two && a.pairs) {
      store_pair(yp, v0, v1);
      return;
    }
  }
  yp[0] = TypeOps<T>::from_f(v0);
  if (two) yp[1] = TypeOps<T>::from_f(v1);
}

constexpr int kGemmBK = 64;      // K slice per pipeline stage (128 bytes of each operand row)
constexpr int kGemmStages = 4;
constexpr int kGemmLD = kGemmBK + 8;  // row pitch 144 bytes: 8 rows of an ldmatrix hit distinct banks

constexpr int kGemmLD8 = kGemmBK + 16;  // FP8 W tile row pitch in bytes (16-byte cp.async rows)

// The stages, plus with FP8 W (W8) the current W tile converted to T (the raw FP8 tiles go to the
// stages' W halves: kGemmLD8 <= 2 * kGemmLD bytes a row).
template <int BM, int BN, bool W8 = false>
constexpr size_t gemm_smem_bytes() {
  return (static_cast<size_t>(kGemmStages) * (BM + BN) + (W8 ? BN : 0)) * kGemmLD * 2;
}

// Block tile coordinates: M tiles on grid x when a.m_fast (blocks that share a W tile run
// together, so W streams from DRAM about once), else on grid y.
__device__ __forceinline__ int tile_m(bool m_fast) { return m_fast ? blockIdx.x : blockIdx.y; }
__device__ __forceinline__ int tile_n(bool m_fast) { return m_fast ? blockIdx.y : blockIdx.x; }

// 16-byte cp.async loads of one operand tile, R rows x kGemmBK, of the K slice at k0 of
// segment 1 or 2 (X side: x / z rows; W side: W rows / B_cat rows). Thread idx loads the vector
// (row, kv) with 8 consecutive threads on 8 consecutive rows. dst(row, kv) is its smem address.
template <typename T, int R, int NTH, bool XSIDE, typename Dst>
__device__ __forceinline__ void load_tile(const GemmArgs<T>& a, int r0, bool seg1, int k0, Dst dst) {
  constexpr int KG = kGemmBK / 8;
  static_assert((R * KG) % NTH == 0 && R % 8 == 0, "tile loads");
  const int rlim = XSIDE ? a.M : a.N, klim = seg1 ? a.K1 : a.K2;  // K1 (K2) % 8 == 0 on this path
#pragma unroll
  for (int i = 0; i < R * KG / NTH; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + NTH * i;
    const int row = (idx / (8 * KG)) * 8 + (idx & 7), kv = ((idx >> 3) % KG) * 8;
    const int r = r0 + row, k = k0 + kv;
    const bool ok = r < rlim && k < klim;
    const T* src = a.W;
    if (ok) {
      if (seg1)
        src = (XSIDE ? a.X : a.W) + static_cast<size_t>(r) * a.K1 + k;
      else
        src = XSIDE ? a.Z + static_cast<size_t>(r) * a.ldz + k
                    : a.B + (static_cast<size_t>(k / a.rank) * a.N + r) * a.rank + k % a.rank;
    }
    cp_async16(dst(row, kv), src, ok);
  }
}

// The FP8 W tile of segment 1, R rows x kGemmBK bytes at k0, with 16-byte cp.async loads into
// raw (row pitch kGemmLD8 bytes); K1 % 16 == 0, so a load is all in K or all out (zeros).
template <typename T, int R, int NTH>
__device__ __forceinline__ void load_tile_fp8(const GemmArgs<T>& a, int r0, int k0, uint8_t* raw) {
  constexpr int KG = kGemmBK / 16;
  static_assert((R * KG) % NTH == 0, "tile loads");
#pragma unroll
  for (int i = 0; i < R * KG / NTH; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + NTH * i;
    const int row = idx / KG, kb = (idx % KG) * 16;
    const int r = r0 + row, k = k0 + kb;
    const bool ok = r < a.N && k < a.K1;
    cp_async16(raw + row * kGemmLD8 + kb, ok ? a.Wq + static_cast<size_t>(r) * a.K1 + k : a.Wq, ok);
  }
}

// fp16/bf16: BM x BN tile per block, WM x WN warps, mma.sync m16n8k16 with fp32 accumulation,
// kGemmStages-deep cp.async pipeline over kGemmBK slices of K. W8: W (segment 1) is FP8; its
// tiles land raw and are converted to T in shared memory before the MMAs (exact), and the
// accumulators are scaled per column once segment 1 is done (before any z B_cat^T slice).
template <typename T, int BM, int BN, int WM, int WN, bool PARTIAL, bool W8>
__global__ void __launch_bounds__(WM * WN * 32)
gemm_tc_kernel(const GemmArgs<T> a) {
  constexpr int BK = kGemmBK, LD = kGemmLD, S = kGemmStages, NTH = WM * WN * 32;
  constexpr int MT = BM / WM / 16, NT = BN / WN / 8;
  static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0, "warp tile");
  extern __shared__ uint4 gemm_smem[];
  auto sx = reinterpret_cast<T(*)[BM][LD]>(gemm_smem);
  auto sw = reinterpret_cast<T(*)[BN][LD]>(reinterpret_cast<T*>(gemm_smem) + S * BM * LD);
  auto swc = reinterpret_cast<T(*)[LD]>(reinterpret_cast<T*>(gemm_smem) + S * (BM + BN) * LD);  // W8 only
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rw = (warp / WN) * (BM / WM), cw = (warp % WN) * (BN / WN);
  const int m0 = tile_m(a.m_fast) * BM, n0 = tile_n(a.m_fast) * BN;
  const int nk1 = (a.K1 + BK - 1) / BK;
  const int nkt = nk1 + (a.K2 + BK - 1) / BK;
  const int t0 = PARTIAL ? static_cast<int>(blockIdx.z) * a.tps : 0;
  const int nk = (PARTIAL ? min(nkt, t0 + a.tps) : nkt) - t0;
  const T zero = TypeOps<T>::from_f(0.f);
  if (PARTIAL) pdl_launch_dependents();  // the next launch (zscale, split-K reduce) waits for this one

  auto load = [&](int kt, int buf) {
    const int t = t0 + kt;
    const bool seg1 = t < nk1;
    if (!seg1) pdl_wait();  // z is written by the preceding zscale launch
    const int k0 = seg1 ? t * BK : (t - nk1) * BK;
    if (W8 && seg1) {  // vec1 holds (the API's FP8 conditions)
      load_tile<T, BM, NTH, true>(a, m0, seg1, k0, [&](int r, int kv) { return &sx[buf][r][kv]; });
      load_tile_fp8<T, BN, NTH>(a, n0, k0, reinterpret_cast<uint8_t*>(&sw[buf][0][0]));
    } else if (seg1 ? a.vec1 : a.vec2) {
      load_tile<T, BM, NTH, true>(a, m0, seg1, k0, [&](int r, int kv) { return &sx[buf][r][kv]; });
      load_tile<T, BN, NTH, false>(a, n0, seg1, k0, [&](int r, int kv) { return &sw[buf][r][kv]; });
    } else {
      const int klim = seg1 ? a.K1 : a.K2;
      for (int idx = tid; idx < BM * BK; idx += NTH) {
        const int row = idx / BK, kk = idx % BK;
        const bool ok = m0 + row < a.M && k0 + kk < klim;
        sx[buf][row][kk] = ok ? *seg_x(a, seg1, m0 + row, k0 + kk) : zero;
      }
      for (int idx = tid; idx < BN * BK; idx += NTH) {
        const int row = idx / BK, kk = idx % BK;
        const bool ok = n0 + row < a.N && k0 + kk < klim;
        sw[buf][row][kk] = ok ? *seg_w(a, seg1, n0 + row, k0 + kk) : zero;
      }
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;
  // W8: acc holds x W_q^T until segment 1 ends; then each column's scale.
  auto scale_columns = [&]() {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int o = n0 + cw + nt * 8 + (lane & 3) * 2 + h;
        const float sc = o < a.N ? __ldg(a.wscale + o) : 0.f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          acc[mt][nt][h] *= sc;
          acc[mt][nt][2 + h] *= sc;
        }
      }
  };

#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < nk) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    // tile kt has landed (S-2 newer groups may still fly); every warp is done with tile kt-1,
    // whose buffer the load below refills
    cp_async_wait<S - 2>();
    __syncthreads();
    if (kt + S - 1 < nk) load(kt + S - 1, (kt + S - 1) % S);
    cp_async_commit();
    const int buf = kt % S;
    T(*wt)[LD] = sw[buf];
    if constexpr (W8) {
      if (t0 + kt < nk1) {  // FP8 W tile: convert the raw bytes in sw[buf] to T in swc
        const uint8_t* raw = reinterpret_cast<const uint8_t*>(&sw[buf][0][0]);
#pragma unroll
        for (int i = 0; i < BN * (BK / 8) / NTH; ++i) {
          const int idx = tid + NTH * i, row = idx / (BK / 8), kb = (idx % (BK / 8)) * 8;
          *reinterpret_cast<uint4*>(&swc[row][kb]) =
              fp8x8_to16<T>(*reinterpret_cast<const uint2*>(raw + row * kGemmLD8 + kb));
        }
        __syncthreads();
        wt = swc;
      } else if (t0 + kt == nk1 && kt > 0) {
        scale_columns();  // the first z B_cat^T slice after x W_q^T slices
      }
    }
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      const int mi = lane >> 3;
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(af[mt], &sx[buf][rw + mt * 16 + (mi & 1) * 8 + (lane & 7)][ks * 16 + (mi >> 1) * 8]);
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        uint32_t r[4];
        ldmatrix_x4(r, &wt[cw + p * 16 + (mi >> 1) * 8 + (lane & 7)][ks * 16 + (mi & 1) * 8]);
        bf[2 * p][0] = r[0]; bf[2 * p][1] = r[1];
        bf[2 * p + 1][0] = r[2]; bf[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  cp_async_wait<0>();
  if constexpr (W8) {
    if (nk > 0 && t0 + nk - 1 < nk1) scale_columns();  // ended inside segment 1
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        gemm_store<T, PARTIAL>(a, m0 + rw + mt * 16 + (lane >> 2) + h * 8, n0 + cw + nt * 8 + (lane & 3) * 2,
                               acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
}

// fp32: the same two-segment GEMM on a SIMT 64 x 64 tile (no fp32 tensor-core path).
constexpr int kF32Tile = 64;
template <bool PARTIAL>
__global__ void __launch_bounds__(kThreads)
gemm_f32_kernel(const GemmArgs<float> a) {
  constexpr int BM = kF32Tile, BN = kF32Tile, BK = 16;
  __shared__ float sx[BK][BM + 4];
  __shared__ float sw[BK][BN + 4];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int m0 = tile_m(a.m_fast) * BM, n0 = tile_n(a.m_fast) * BN;
  const int kbeg = PARTIAL ? static_cast<int>(blockIdx.z) * a.tps * kGemmBK : 0;
  const int kend = PARTIAL ? min(a.K1, kbeg + a.tps * kGemmBK) : a.K1;
  const int nk1 = (kend - kbeg + BK - 1) / BK;
  const int nk = nk1 + (PARTIAL ? 0 : (a.K2 + BK - 1) / BK);
  float acc[4][4] = {};
  for (int kt = 0; kt < nk; ++kt) {
    const bool seg1 = kt < nk1;
    const int k0 = seg1 ? kbeg + kt * BK : (kt - nk1) * BK;
    const int klim = seg1 ? kend : a.K2;
#pragma unroll
    for (int i = 0; i < (BM * BK) / kThreads; ++i) {
      const int idx = tid + kThreads * i, row = idx / BK, kk = idx % BK;
      const bool kin = k0 + kk < klim;
      sx[kk][row] = (kin && m0 + row < a.M) ? *seg_x(a, seg1, m0 + row, k0 + kk) : 0.f;
      sw[kk][row] = (kin && n0 + row < a.N) ? *seg_w(a, seg1, n0 + row, k0 + kk) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float xa[4], wb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) { xa[i] = sx[kk][ty * 4 + i]; wb[i] = sw[kk][tx * 4 + i]; }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xa[i], wb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; j += 2)
      gemm_store<float, PARTIAL>(a, m0 + ty * 4 + i, n0 + tx * 4 + j, acc[i][j], acc[i][j + 1]);
}

// z[n, c] = T(c[n, c / rank] * sum_s P[s, n, c]) for c < kz (see the top of this section).
template <typename T>
__global__ void __launch_bounds__(kThreads)
zscale_kernel(int rows, int kz, int ldz, int rank, int splits, const float* __restrict__ P,
              const int32_t* __restrict__ ids, const float* __restrict__ gates, int top_k,
              float scale, T* __restrict__ z) {
  pdl_launch_dependents();  // the final GEMM streams x W^T meanwhile and waits before reading z
  pdl_wait();               // P comes from the shrink
  const long long total = static_cast<long long>(rows) * kz;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * kThreads) {
    const int n = static_cast<int>(i / kz), c = static_cast<int>(i % kz);
    const int e = c / rank;
    float cf = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const size_t slot = static_cast<size_t>(n) * top_k + j;
      if (ids[slot] == e) cf += gates[slot];
    }
    float s = 0.f;
    if (cf != 0.f)
      for (int sp = 0; sp < splits; ++sp) s += P[static_cast<size_t>(sp) * total + i];
    z[static_cast<size_t>(n) * ldz + c] = TypeOps<T>::from_f(scale * cf * s);
  }
}

// y = T(sum_s P[s] + bias): the split-K final GEMM's partials [splits, rows, out].
template <typename T>
__global__ void __launch_bounds__(kThreads)
splitk_reduce_kernel(int rows, int out, int splits, const float* __restrict__ P, const T* __restrict__ bias,
                     T* __restrict__ y) {
  pdl_wait();  // P comes from the split GEMM
  const long long total = static_cast<long long>(rows) * out;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * kThreads) {
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += P[static_cast<size_t>(sp) * total + i];
    if (bias) v += ldf(bias + i % out);
    y[i] = TypeOps<T>::from_f(v);
  }
}
// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Many-rows sizes, a function of the arguments only (the workspace size needs no device).
// None of these depends on rows, so the workspace size grows with rows (a caller may size it
// once for its largest row count, as the TensorRT plugin does).
constexpr int kSplitRows = 64;  // at most this many rows: the final GEMM is split over K
struct ManyRowsPlan {
  int kz;       // E * rank: LoRA columns of z
  int ldz;      // z row pitch (elements), a multiple of 8: 16-byte aligned rows
  int splits;   // K splits of the shrink
  int tps;      // K tiles (kGemmBK wide) per shrink split
  int ysplits;  // K splits of the final GEMM at <= kSplitRows rows (1: not split)
  int ytps;     // K tiles per final split
};

// nk K tiles in at most max_splits splits of >= 8 tiles each.
void split_k(int nk, long long max_splits, int* splits, int* tps) {
  const int s = static_cast<int>(std::max(1ll, std::min<long long>(max_splits, nk / 8)));
  *tps = (nk + s - 1) / s;
  *splits = (nk + *tps - 1) / *tps;
}

ManyRowsPlan many_rows_plan(int in, int out, int E, int rank) {
  ManyRowsPlan p;
  p.kz = E * rank;
  p.ldz = (p.kz + 7) / 8 * 8;
  const int nk1 = (in + kGemmBK - 1) / kGemmBK;
  // The shrink has few output tiles (ceil(rows/64) x ceil(E*rank/64): 16 at 512 rows, E8 r16)
  // over a long K: 8 splits.
  split_k(nk1, 8, &p.splits, &p.tps);
  // The final GEMM at <= 64 rows has one row of ceil(out/64) tiles, too few blocks to stream W
  // at full bandwidth: split its K (x W^T slices, then z B_cat^T slices) to about 256 blocks.
  const long long tiles = (static_cast<long long>(out) + 63) / 64;
  split_k(nk1 + (p.kz + kGemmBK - 1) / kGemmBK, (256 + tiles - 1) / tiles, &p.ysplits, &p.ytps);
  return p;
}

// Workspace: few rows: t [rows, top_k, rank] fp32, then a 16-byte flag. Many rows: z [rows, ldz] (x's dtype, sized
// for fp32), the shrink's partials P [splits, rows, E*rank] fp32, then the split final GEMM's
// partials Py [ysplits, min(rows, 64), out] fp32 when ysplits > 1 (kept at 64 rows above that,
// unused, so the size never shrinks as rows grow; apart from P: x W^T splits run while zscale
// still reads P); never less than the few-rows size. Each part 256-byte aligned.
struct Layout {
  size_t t_off, flag_off, z_off, p_off, py_off, total;
};

Layout make_layout(int rows, int in, int out, int E, int rank, int top_k) {
  Layout L{};
  const size_t t_bytes = align_up(static_cast<size_t>(rows) * top_k * rank * sizeof(float), 256);
  if (rows <= kGemvMaxRows) {  // t, then the shrink's 16-byte x_ready flag
    L.flag_off = t_bytes;
    L.total = t_bytes + 16;
    L.z_off = L.p_off = L.py_off = L.total;
    return L;
  }
  const ManyRowsPlan p = many_rows_plan(in, out, E, rank);
  L.t_off = L.z_off = 0;
  size_t off = align_up(static_cast<size_t>(rows) * p.ldz * sizeof(float), 256);
  L.p_off = off;
  off += align_up(static_cast<size_t>(p.splits) * rows * p.kz * sizeof(float), 256);
  L.py_off = off;
  if (p.ysplits > 1)
    off += align_up(static_cast<size_t>(p.ysplits) * std::min(rows, kSplitRows) * out * sizeof(float), 256);
  L.total = std::max(off, t_bytes + 16);
  return L;
}

// Every limit of adafuse_kernels.h, rows included (documented as checked; it also keeps the
// many-rows GEMMs' tile grid valid, so no launch after the first can fail on the grid).
bool args_ok(int rows, int in, int out, int E, int rank, int top_k) {
  return rows >= 0 && rows <= ADAFUSE_LORA_MAX_ROWS && in >= 1 && out >= 1 && E >= 1 && E <= kMaxExperts &&
         rank >= 1 && rank <= kMaxRank && top_k >= 1 && top_k <= kMaxTopK;
}

// The one-row kernel's shape (adafuse_gemv1_shape): 16-byte loads in flight per lane (U), rows
// per warp (N), warps per row (K). AUTO by measurement on the H200 (gemv_sites.json, 7B sites):
// K2 for out >= 8192, else N1. SIMT: the warp-per-row kernel of 2-16 rows.
// The shrink (adafuse_shrink_kind), AUTO: block per dot at one row (the r64 sites' SIMT path: 5.24 ms per 7B step against 5.51
// with warps), warp per dot at 2-16 rows (batch 8: r16 6.44 against 6.71 ms, r64 7.80 against
// 8.46), same-run A/B on the H200, 2026-11-29 (benchmarks/results/shrink_ab.log).

// x staged in dynamic shared memory: static plus dynamic must fit the default 48 KB without
// opting in, and the split-K variant has a small static array (32 bytes): 1 KB is kept for it.
constexpr int kGemv1MaxXBytes = 47 * 1024;
// LoRA pairs (top_k * rank) up to which the default one-row path is gemv1: measured faster than
// the SIMT kernel at the 7B's r16 sites (32-96 pairs), slower at its r64 sites (128-384 pairs,
// gemv_sites.json of 2026-11-29: e.g. qkv 52.9 vs 37.0 us).
constexpr long long kGemv1MaxPairs = 96;

template <typename T, typename WT, int U, int NO, int KS>
int launch_gemv1(Pdl pdl, int in, int out, const T* x, const WT* W, const float* wsc, const T* bias, const T* B, int E,
                 int rank, const int32_t* ids, int top_k, const float* t, T* y, const unsigned* x_ready,
                 cudaStream_t stream) {
  constexpr long long kRowsPerBlock = (kThreads / 32 / KS) * NO;
  const long long blocks = (out + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffffll) return ADAFUSE_ERR_INVALID_ARGUMENT;
  return launch_ex(gemv1_kernel<T, WT, U, NO, KS>, dim3(static_cast<unsigned>(blocks)), kThreads,
                   static_cast<size_t>(in) * sizeof(T), pdl, stream, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t,
                   y, x_ready);
}

template <typename T, typename WT>
int run_gemv1(int32_t shape, Pdl pdl, int in, int out, const T* x, const WT* W, const float* wsc, const T* bias, const T* B, int E,
              int rank, const int32_t* ids, int top_k, const float* t, T* y, const unsigned* x_ready,
              cudaStream_t s) {
  if (shape == ADAFUSE_GEMV1_AUTO) shape = out >= 8192 ? ADAFUSE_GEMV1_U4K2 : ADAFUSE_GEMV1_U4N1;
  switch (shape) {
    case ADAFUSE_GEMV1_U8N1: return launch_gemv1<T, WT, 8, 1, 1>(pdl, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, x_ready, s);
    case ADAFUSE_GEMV1_U4N2: return launch_gemv1<T, WT, 4, 2, 1>(pdl, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, x_ready, s);
    case ADAFUSE_GEMV1_U4K2: return launch_gemv1<T, WT, 4, 1, 2>(pdl, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, x_ready, s);
    default: return launch_gemv1<T, WT, 4, 1, 1>(pdl, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, x_ready, s);
  }
}

template <typename T, typename WT, int R, int NO, bool VEC>
int launch_gemv(Pdl pdl, int rows, int in, int out, const T* x, const WT* W, const float* wsc, const T* bias,
                const T* B, int E, int rank, const int32_t* ids, int top_k, const float* t, T* y,
                cudaStream_t stream) {
  const long long warps = (static_cast<long long>(out) + NO - 1) / NO;
  const long long blocks = (warps + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > 0x7fffffffll) return ADAFUSE_ERR_INVALID_ARGUMENT;
  return launch_ex(gemv_lora_kernel<T, WT, R, NO, VEC>, dim3(static_cast<unsigned>(blocks)), kThreads, 0, pdl, stream,
                   rows, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y);
}

template <typename T, typename WT, int NT>
int launch_gemv_mma(Pdl pdl, int rows, int in, int out, const T* x, const WT* W, const float* wsc, const T* bias, const T* B, int E,
                    int rank, const int32_t* ids, int top_k, const float* t, T* y, cudaStream_t stream) {
  const long long blocks = (static_cast<long long>(out) + 15) / 16;
  // 16-byte B rows need rank * sizeof(T) % 16 == 0 (t rows then stay 16-byte aligned too)
  const bool vec_b = t && rank % TypeOps<T>::kVec == 0 && aligned16(B) && aligned16(t);
  return launch_ex(gemv_mma_kernel<T, WT, NT>, dim3(static_cast<unsigned>(blocks)), kThreads, 0, pdl, stream, rows, in,
                   out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, vec_b, t != nullptr);
}

template <typename T, typename WT, bool VEC>
int run_gemv_rows(Pdl pdl, int rows, int in, int out, const T* x, const WT* W, const float* wsc, const T* bias,
                  const T* B, int E, int rank, const int32_t* ids, int top_k, const float* t,
                  T* y, cudaStream_t s) {
  if (rows == 1) return launch_gemv<T, WT, 1, 1, VEC>(pdl, rows, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, s);
  if (rows == 2) return launch_gemv<T, WT, 2, 1, VEC>(pdl, rows, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, s);
  if (rows <= 4) return launch_gemv<T, WT, 4, 2, VEC>(pdl, rows, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, s);
  return launch_gemv<T, WT, 8, 2, VEC>(pdl, rows, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, s);
}


template <typename T, typename WT>
int run_few_rows(int rows, int in, int out, const T* x, const WT* W, const float* wsc, const T* bias, const T* A,
                 const T* B, int E, int rank, const int32_t* ids, const float* gates, int top_k,
                 float scale, T* y, char* ws, const Layout& L, const adafuse_lora_options& opt,
                 cudaStream_t stream) {
  constexpr int V = TypeOps<T>::kVec;
  float* t = A ? reinterpret_cast<float*>(ws + L.t_off) : nullptr;  // A == nullptr: no adapter
  const long long slots = static_cast<long long>(rows) * top_k;
  // One row: the GEMV is a programmatic dependent (sm_90) of the shrink, which raises x_ready
  // once the previous kernel has completed; the GEMV streams W x from that signal on and waits
  // for the shrink (t) only before its LoRA epilogue. The shrink clears x_ready before it waits
  // for the previous kernel, so it is a programmatic dependent itself only where the caller's
  // workspace is exclusive (adafuse_lora_options): a write into memory that an earlier kernel may
  // still read (TensorRT's scratch, a block the caching allocator handed out again) would corrupt
  // that kernel. 2-16 rows: the shrink is launched after the previous kernel completes and the
  // GEMV streams W x while it runs, reading x through L1 (through L2, as the x_ready protocol
  // must, it measured slower). No adapter: the GEMV waits for the previous kernel itself.
  DeviceInfo di;
  int st = device_info(stream, &di);
  if (st != ADAFUSE_OK) return st;
  const Pdl pdl = pdl_request(di, opt.pdl == ADAFUSE_PDL_AUTO);
  const bool vec_a = (in % V == 0) && aligned16(x) && aligned16(A);
  const bool vec_w = (in % V == 0) && aligned16(x) && aligned16(W);
  const int32_t shape = opt.gemv1;
  const bool one_row = rows == 1 && vec_w && in * static_cast<long long>(sizeof(T)) <= kGemv1MaxXBytes &&
                       shape != ADAFUSE_GEMV1_SIMT &&
                       (shape != ADAFUSE_GEMV1_AUTO || !t || static_cast<long long>(top_k) * rank <= kGemv1MaxPairs);
  unsigned* x_ready = t ? reinterpret_cast<unsigned*>(ws + L.flag_off) : nullptr;
  const long long blocks = slots * rank;  // <= kGemvMaxRows * kMaxTopK * kMaxRank
  const bool warp_shrink =
      !one_row && (opt.shrink == ADAFUSE_SHRINK_WARP || (opt.shrink == ADAFUSE_SHRINK_AUTO && rows >= 2));
  if (t && warp_shrink) {
    const dim3 grid(static_cast<unsigned>((blocks * 32 + kThreads - 1) / kThreads));
    st = vec_a ? launch_ex(shrink_warp_kernel<T, true>, grid, kThreads, 0, kNoPdl, stream, rows, in, E, rank, top_k, x,
                           A, ids, gates, scale, t)
               : launch_ex(shrink_warp_kernel<T, false>, grid, kThreads, 0, kNoPdl, stream, rows, in, E, rank, top_k, x,
                           A, ids, gates, scale, t);
    if (st != ADAFUSE_OK) return st;
  } else if (t) {
    const Pdl spdl = pdl.when(one_row && opt.exclusive_workspace != 0);
    const dim3 grid(static_cast<unsigned>(blocks));
    st = vec_a ? launch_ex(shrink_dot_kernel<T, true>, grid, kThreads, 0, spdl, stream, in, E, rank, top_k, x, A, ids,
                           gates, scale, t, x_ready)
               : launch_ex(shrink_dot_kernel<T, false>, grid, kThreads, 0, spdl, stream, in, E, rank, top_k, x, A, ids,
                           gates, scale, t, x_ready);
    if (st != ADAFUSE_OK) return st;
  }
  if (one_row) return run_gemv1<T, WT>(shape, pdl, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, x_ready, stream);
  if constexpr (!std::is_same<T, float>::value) {
    if (rows >= 2 && vec_w) {  // tensor-core skinny GEMM
      if (rows <= 8)
        return launch_gemv_mma<T, WT, 1>(pdl, rows, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, stream);
      return launch_gemv_mma<T, WT, 2>(pdl, rows, in, out, x, W, wsc, bias, B, E, rank, ids, top_k, t, y, stream);
    }
  }
  // SIMT GEMV, in passes of at most 8 rows (each pass reads W again)
  for (int r0 = 0; r0 < rows; r0 += 8) {
    const int rr = min(8, rows - r0);
    const T* xs = x + static_cast<size_t>(r0) * in;
    const int32_t* is = ids ? ids + static_cast<size_t>(r0) * top_k : nullptr;
    const float* tsl = t ? t + static_cast<size_t>(r0) * top_k * rank : nullptr;
    T* ys = y + static_cast<size_t>(r0) * out;
    const int st2 = vec_w
        ? run_gemv_rows<T, WT, true>(pdl, rr, in, out, xs, W, wsc, bias, B, E, rank, is, top_k, tsl, ys, stream)
        // FP8 W always has 16-byte rows (adafuse_lora_linear checks), so its scalar variant is never built
        : run_gemv_rows<T, WT, kIsFp8<WT>>(pdl, rr, in, out, xs, W, wsc, bias, B, E, rank, is, top_k, tsl, ys, stream);
    if (st2 != ADAFUSE_OK) return st2;
  }
  return ADAFUSE_OK;
}

// The opt-in to more than 48 KB of dynamic shared memory, once per (kernel, device).
template <typename K>
int opt_in_smem(K kern, size_t smem, const DeviceInfo& di, std::atomic<int>* done) {
  if (smem <= 48 * 1024) return ADAFUSE_OK;
  if (smem > static_cast<size_t>(di.max_smem_optin)) return ADAFUSE_ERR_INVALID_ARGUMENT;
  const bool cached = di.device >= 0 && di.device < kMaxDevices;
  if (cached && done[di.device].load(std::memory_order_acquire)) return ADAFUSE_OK;
  AF_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (cached) done[di.device].store(1, std::memory_order_release);
  return ADAFUSE_OK;
}

// Grid of BM x BN tiles (x splits on z): M tiles on x while the N tiles fit grid y.
template <typename T>
int tile_grid(int BM, int BN, int splits, GemmArgs<T>* a, dim3* grid) {
  const long long mt = (static_cast<long long>(a->M) + BM - 1) / BM, nt = (static_cast<long long>(a->N) + BN - 1) / BN;
  a->m_fast = nt <= 65535;
  if (!a->m_fast && mt > 65535) return ADAFUSE_ERR_INVALID_ARGUMENT;
  *grid = a->m_fast ? dim3(static_cast<unsigned>(mt), static_cast<unsigned>(nt), static_cast<unsigned>(splits))
                    : dim3(static_cast<unsigned>(nt), static_cast<unsigned>(mt), static_cast<unsigned>(splits));
  return ADAFUSE_OK;
}

template <typename T, int BM, int BN, int WM, int WN, bool PARTIAL, bool W8 = false>
int launch_gemm_tc(const DeviceInfo& di, GemmArgs<T> a, int splits, Pdl pdl, cudaStream_t stream) {
  static std::atomic<int> opted[kMaxDevices];
  constexpr size_t smem = gemm_smem_bytes<BM, BN, W8>();
  auto kern = gemm_tc_kernel<T, BM, BN, WM, WN, PARTIAL, W8>;
  int st = opt_in_smem(kern, smem, di, opted);
  if (st != ADAFUSE_OK) return st;
  dim3 grid;
  st = tile_grid(BM, BN, splits, &a, &grid);
  if (st != ADAFUSE_OK) return st;
  return launch_ex(kern, grid, WM * WN * 32, smem, pdl, stream, a);
}

template <bool PARTIAL>
int launch_gemm_f32(GemmArgs<float> a, int splits, cudaStream_t stream) {
  dim3 grid;
  const int st = tile_grid(kF32Tile, kF32Tile, splits, &a, &grid);
  if (st != ADAFUSE_OK) return st;
  gemm_f32_kernel<PARTIAL><<<grid, kThreads, 0, stream>>>(a);
  AF_LAUNCH_CHECK();
  return ADAFUSE_OK;
}

template <typename T, typename WT>
int run_many_rows(int rows, int in, int out, const T* x, const WT* W, const float* wsc, const T* bias, const T* A,
                  const T* B, int E, int rank, const int32_t* ids, const float* gates, int top_k,
                  float scale, T* y, char* ws, const Layout& L, const adafuse_lora_options& opt,
                  cudaStream_t stream) {
  DeviceInfo di;
  int st = device_info(stream, &di);
  if (st != ADAFUSE_OK) return st;
  constexpr int V = TypeOps<T>::kVec;
  const bool adapter = A != nullptr;
  // No adapter: no z columns (kz = 0), so the final GEMM's K is `in` alone; its split-K partials
  // then fit the workspace sized for the caller's (E, rank) (fewer K tiles, no more splits).
  const ManyRowsPlan p = many_rows_plan(in, out, adapter ? E : 0, rank);
  T* z = reinterpret_cast<T*>(ws + L.z_off);
  float* P = reinterpret_cast<float*>(ws + L.p_off);

  GemmArgs<T> s{};  // shrink: P = x A_cat^T
  s.M = rows; s.N = p.kz; s.X = x; s.W = A; s.K1 = in; s.P = P; s.tps = p.tps;
  s.vec1 = in % V == 0 && aligned16(x) && aligned16(A);
  GemmArgs<T> g{};  // y = [x | z] [W | B_cat]^T + bias
  constexpr bool W8 = kIsFp8<WT>;
  g.M = rows; g.N = out; g.X = x; g.K1 = in;
  if constexpr (W8) {
    g.Wq = W;
    g.wscale = wsc;
  } else {
    g.W = W;
  }
  g.Z = z; g.B = B; g.K2 = p.kz; g.rank = rank; g.ldz = p.ldz; g.bias = bias; g.Y = y;
  g.vec1 = in % V == 0 && aligned16(x) && aligned16(W);
  g.vec2 = rank % V == 0 && aligned16(B);  // z rows are 16-byte aligned (ldz % 8 == 0)
  g.pairs = out % 2 == 0 && (reinterpret_cast<uintptr_t>(y) & 3u) == 0;

  // The first kernel (the shrink GEMM) in stream order, the rest programmatic dependents of it.
  // Without an adapter the final GEMM is the first kernel: it reads x without griddepcontrol.wait
  // (that wait guards z only), so it runs in stream order; the split-K reduce after it waits.
  const Pdl pdl = pdl_request(di, opt.pdl == ADAFUSE_PDL_AUTO && adapter);
  const Pdl reduce_pdl = pdl_request(di, opt.pdl == ADAFUSE_PDL_AUTO);
  if (adapter) {
    if constexpr (std::is_same<T, float>::value) {
      st = launch_gemm_f32<true>(s, p.splits, stream);
    } else {
      st = launch_gemm_tc<T, 64, 64, 2, 2, true>(di, s, p.splits, kNoPdl, stream);
    }
    if (st != ADAFUSE_OK) return st;
    const long long total = static_cast<long long>(rows) * p.kz;
    const long long zb = std::min<long long>((total + kThreads - 1) / kThreads, 65535);
    st = launch_ex(zscale_kernel<T>, dim3(static_cast<unsigned>(zb)), kThreads, 0, pdl, stream, rows, p.kz, p.ldz,
                   rank, p.splits, static_cast<const float*>(P), ids, gates, top_k, scale, z);
    if (st != ADAFUSE_OK) return st;
  } else {
    g.Z = nullptr;
    g.B = nullptr;
    g.K2 = 0;
    g.vec2 = false;
  }
  if constexpr (std::is_same<T, float>::value) {
    return launch_gemm_f32<false>(g, 1, stream);
  } else {
    if (rows <= kSplitRows && p.ysplits > 1) {  // split K, then y = sum + bias
      g.P = reinterpret_cast<float*>(ws + L.py_off);
      g.tps = p.ytps;
      st = launch_gemm_tc<T, 64, 64, 2, 2, true, W8>(di, g, p.ysplits, pdl, stream);
      if (st != ADAFUSE_OK) return st;
      const long long yb = std::min<long long>((static_cast<long long>(rows) * out + kThreads - 1) / kThreads, 65535);
      return launch_ex(splitk_reduce_kernel<T>, dim3(static_cast<unsigned>(yb)), kThreads, 0, reduce_pdl, stream, rows, out,
                       p.ysplits, static_cast<const float*>(g.P), bias, y);
    }
    if (gemm_smem_bytes<128, 128, W8>() <= static_cast<size_t>(di.max_smem_optin))
      return launch_gemm_tc<T, 128, 128, 2, 4, false, W8>(di, g, 1, pdl, stream);
    // 144 KB of stages (162 with FP8 W) do not fit a block (sm_86, sm_89, sm_120 allow 99 KB)
    return launch_gemm_tc<T, 64, 64, 2, 2, false, W8>(di, g, 1, pdl, stream);
  }
}

template <typename T, typename WT = T>
int dispatch(int rows, int in, int out, const void* x, const void* W, const void* bias,
             const void* A, const void* B, int E, int rank, const int32_t* ids, const float* gates,
             int top_k, float scale, void* y, void* ws, const Layout& L, const adafuse_lora_options& opt,
             cudaStream_t stream) {
  auto run = rows <= kGemvMaxRows ? run_few_rows<T, WT> : run_many_rows<T, WT>;
  return run(rows, in, out, static_cast<const T*>(x), static_cast<const WT*>(W), opt.weight_scale,
             static_cast<const T*>(bias),
             static_cast<const T*>(A), static_cast<const T*>(B), E, rank, ids, gates, top_k, scale,
             static_cast<T*>(y), static_cast<char*>(ws), L, opt, stream);
}

bool options_ok(const adafuse_lora_options& o) {
  return (o.pdl == ADAFUSE_PDL_AUTO || o.pdl == ADAFUSE_PDL_OFF) && o.gemv1 >= ADAFUSE_GEMV1_AUTO &&
         o.gemv1 <= ADAFUSE_GEMV1_SIMT && o.shrink >= ADAFUSE_SHRINK_AUTO && o.shrink <= ADAFUSE_SHRINK_WARP &&
         (o.exclusive_workspace == 0 || o.exclusive_workspace == 1) &&
         ((o.weight_dtype == ADAFUSE_WEIGHT_AS_DTYPE && !o.weight_scale) ||
          (o.weight_dtype == ADAFUSE_WEIGHT_FP8_E4M3 && o.weight_scale));
}

// FP8 W (ADAFUSE_WEIGHT_FP8_E4M3): 16-bit activations and whole 16-byte W rows (every path then
// takes its vector loads; see adafuse_kernels.h).
bool fp8_call_ok(adafuse_dtype dtype, int in, const void* x, const void* W) {
  return (dtype == ADAFUSE_FLOAT16 || dtype == ADAFUSE_BFLOAT16) && in % 16 == 0 && aligned16(x) && aligned16(W);
}

}  // namespace
}  // namespace adafuse

extern "C" {

size_t adafuse_lora_linear_workspace_size(int rows, int in_features, int out_features,
                                          int num_experts, int rank, int top_k) {
  using namespace adafuse;
  if (!args_ok(rows, in_features, out_features, num_experts, rank, top_k)) return 0;
  return make_layout(rows, in_features, out_features, num_experts, rank, top_k).total;
}

int adafuse_lora_linear(adafuse_dtype dtype, int rows, int in_features, int out_features,
                        const void* x, const void* W, const void* bias, const void* A,
                        const void* B, int num_experts, int rank, const int32_t* expert_ids,
                        const float* gates, int top_k, float scale, void* y, void* workspace,
                        size_t workspace_bytes, const adafuse_lora_options* options, cudaStream_t stream) {
  using namespace adafuse;
  const adafuse_lora_options opt = options ? *options : adafuse_lora_options{};
  if (!valid_dtype(dtype) || !options_ok(opt)) return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (!args_ok(rows, in_features, out_features, num_experts, rank, top_k))
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (rows == 0) return ADAFUSE_OK;
  if (!x || !W || !y || !A != !B || (A && (!expert_ids || !gates))) return ADAFUSE_ERR_INVALID_ARGUMENT;
  const Layout L = make_layout(rows, in_features, out_features, num_experts, rank, top_k);
  if (L.total > 0 && (!workspace || workspace_bytes < L.total)) return ADAFUSE_ERR_WORKSPACE;
  if (reinterpret_cast<uintptr_t>(workspace) & 15u) return ADAFUSE_ERR_WORKSPACE;  // 16-byte aligned
  if (opt.weight_dtype == ADAFUSE_WEIGHT_FP8_E4M3) {
    if (!fp8_call_ok(dtype, in_features, x, W)) return ADAFUSE_ERR_INVALID_ARGUMENT;
    if (dtype == ADAFUSE_FLOAT16)
      return dispatch<__half, __nv_fp8_e4m3>(rows, in_features, out_features, x, W, bias, A, B, num_experts, rank,
                                             expert_ids, gates, top_k, scale, y, workspace, L, opt, stream);
    return dispatch<__nv_bfloat16, __nv_fp8_e4m3>(rows, in_features, out_features, x, W, bias, A, B, num_experts,
                                                  rank, expert_ids, gates, top_k, scale, y, workspace, L, opt, stream);
  }
  switch (dtype) {
    case ADAFUSE_FLOAT32:
      return dispatch<float>(rows, in_features, out_features, x, W, bias, A, B, num_experts, rank,
                             expert_ids, gates, top_k, scale, y, workspace, L, opt, stream);
    case ADAFUSE_FLOAT16:
      return dispatch<__half>(rows, in_features, out_features, x, W, bias, A, B, num_experts, rank,
                              expert_ids, gates, top_k, scale, y, workspace, L, opt, stream);
    case ADAFUSE_BFLOAT16:
      return dispatch<__nv_bfloat16>(rows, in_features, out_features, x, W, bias, A, B,
                                     num_experts, rank, expert_ids, gates, top_k, scale, y,
                                     workspace, L, opt, stream);
  }
  return ADAFUSE_ERR_INVALID_ARGUMENT;
}

}  // extern "C"
