// switch.cu - the fused switch (the paper's SGMM): one launch updates every
// adapted weight of every layer,
//   pristine (W_base != NULL): W = W_base + sum_j c_j B[new_j] A[new_j]
//   in place (W_base == NULL):  W += sum_j c_j B[new_j] A[new_j] - sum_j c'_j B[old_j] A[old_j]
// with c_j = scale * gate_j, accumulated in fp32 and rounded once. An FP8 (e4m3) W_base enters
// as W8[o, i] * base_scale[o] (16-bit W only, pristine mode only): the merged W has the model's
// dtype, since merging the deltas into FP8 would round them away.
//
// Work decomposition: a persistent grid walks the concatenation of all sites'
// 64 x 128 tiles of W (a segmented gather-GEMM). Each block builds, once, the
// prefix sum of tiles per site in shared memory and maps a tile to its site by
// binary search. Per tile: the W (or W_base) tile is loaded into registers
// first (16-byte loads), then the low-rank delta is computed from the routed
// experts' B rows and A columns (K = terms x rank, staged 64 k-rows at a time
// in shared memory) with mma.sync m16n8k16 (fp16/bf16 operands, fp32
// accumulators, one fp32 partial per term so the coefficient is applied in
// fp32), staged through shared memory and added to the W registers, and the
// tile is written back with 16-byte stores (an FP8 W_base tile: 8-byte loads of 8 e4m3,
// converted exactly and scaled in fp32 where the delta is added). fp32 weights use a SIMT path.
// A site whose dims are non-positive or above max_* is skipped.
// The no-op check (route unchanged) is done by every block on the device.
#include "common.cuh"

#include <mutex>

#include <type_traits>

namespace adafuse {
namespace {

constexpr int kThreads = 256;
constexpr int BM = 64;   // rows (out) per tile
constexpr int BN = 128;  // cols (in) per tile
constexpr int kMaxTopK = ADAFUSE_MAX_TOP_K;
constexpr int kMaxTerms = 2 * kMaxTopK;

// mma path staging
constexpr int KS16 = 64;            // k rows per stage
constexpr int LDB16 = KS16 + 8;     // sB row stride (elements)
constexpr int LDA16 = BN + 8;       // sA row stride (elements)
constexpr int LDD = BN + 4;         // sD row stride (floats)
// fp32 path staging
constexpr int KS32 = 32;
constexpr int LDB32 = KS32 + 1;

__host__ __device__ constexpr size_t align_up_c(size_t v, size_t a) { return (v + a - 1) / a * a; }

template <typename T>
constexpr size_t tile_smem_bytes() {
  if (std::is_same<T, float>::value) {
    return align_up_c(sizeof(float) * BM * LDB32, 16) + sizeof(float) * KS32 * BN;
  } else {
    const size_t ops = align_up_c(sizeof(T) * BM * LDB16, 16) + sizeof(T) * KS16 * LDA16;
    const size_t d = sizeof(float) * BM * LDD;
    return ops > d ? ops : d;
  }
}

// A site's base fields (adafuse_switch_check_site's rule, on the host and the device): a dtype
// base has no scales; an FP8 base needs a 16-bit dtype, pristine mode and its scales.
__host__ __device__ __forceinline__ bool site_base_valid(bool sixteen_bit, const adafuse_switch_site& s) {
  if (s.base_dtype == ADAFUSE_WEIGHT_AS_DTYPE) return s.base_scale == nullptr;
  return s.base_dtype == ADAFUSE_WEIGHT_FP8_E4M3 && sixteen_bit && s.W_base != nullptr && s.base_scale != nullptr;
}

template <typename T>
__device__ __forceinline__ int site_tiles(const adafuse_switch_site& s, int max_out, int max_in) {
  if (!s.W || !s.A || !s.B || s.out_features < 1 || s.in_features < 1 || s.rank < 1 ||
      s.num_experts < 1 || s.out_features > max_out || s.in_features > max_in ||
      !site_base_valid(!std::is_same<T, float>::value, s))
    return 0;
  return ((s.out_features + BM - 1) / BM) * ((s.in_features + BN - 1) / BN);
}

// Raw (bit-exact) vector load / store of V consecutive elements, `valid` of
// them in range; vectorised when `vec` (16-byte aligned, full vector).
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* p, bool vec, int valid) {
  constexpr int V = TypeOps<T>::kVec;
  if (vec && valid == V) return *reinterpret_cast<const uint4*>(p);
  uint32_t w[4] = {0, 0, 0, 0};
  if (sizeof(T) == 4) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) if (k < valid) w[k] = q[k];
  } else {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (k < valid) w[k >> 1] |= static_cast<uint32_t>(q[k]) << ((k & 1) * 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}
// 8 consecutive e4m3 bytes, `valid` of them in range (the rest 0); one 8-byte load when `vec`.
__device__ __forceinline__ uint2 load_fp8x8(const uint8_t* p, bool vec, int valid) {
  if (vec && valid == 8) return *reinterpret_cast<const uint2*>(p);
  uint32_t w[2] = {0, 0};
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (k < valid) w[k >> 2] |= static_cast<uint32_t>(p[k]) << ((k & 3) * 8);
  return make_uint2(w[0], w[1]);
}
template <typename T>
__device__ __forceinline__ void store_raw(T* p, const uint4& v, bool vec, int valid) {
  constexpr int V = TypeOps<T>::kVec;
  if (vec && valid == V) { *reinterpret_cast<uint4*>(p) = v; return; }
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if (sizeof(T) == 4) {
    uint32_t* q = reinterpret_cast<uint32_t*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) if (k < valid) q[k] = w[k];
  } else {
    uint16_t* q = reinterpret_cast<uint16_t*>(p);
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (k < valid) q[k] = static_cast<uint16_t>(w[k >> 1] >> ((k & 1) * 16));
  }
}


// ---- resident kernel: pipelined, operand-resident switch (fp16 / bf16) ----
// Each block takes a contiguous range of the tile sequence, ordered per site
// column strip first (o fastest), so consecutive tiles of a block share the
// A columns [K x BN]: A is loaded once per strip into shared memory and stays
// resident. W (or W_base) tiles and the B rows [BM x K] stream through an
// S-stage cp.async ring (S-1 tiles in flight while one is computed; no W in
// registers). The delta is added to the W tile in shared memory in the
// accumulator layout, then written with 16-byte coalesced stores.
// K = terms * rank16 must fit: the launch tries 2 blocks/SM, then 1 block/SM,
// then falls back to the chunked kernel (switch_chunked_kernel: K in chunks, W in registers;
// also the fp32 path), all decided on the device.
constexpr int kMaxStages = 6;
constexpr int LDW = BN + 8;  // sA and sW row stride (elements)
// An FP8 W_base tile sits in its stage's sW as bytes [BM][LDW8] (half of sW's bytes; the rows map
// to distinct bank pairs where the accumulator layout reads them) until the add turns it into T.
constexpr int LDW8 = BN + 16;
static_assert(BM * LDW8 <= BM * LDW * 2, "an FP8 tile fits in a 16-bit stage's sW");

__host__ __device__ inline int resident_prefix_bytes(int num_sites) {
  return static_cast<int>(align_up_c(sizeof(int) * (static_cast<size_t>(num_sites) + 1), 128));
}
// Stages that fit in smem_bytes for a K of kmax (0: this configuration cannot run it).
__host__ __device__ inline int resident_stages(int kmax, int num_sites, int smem_bytes) {
  const long long pre = resident_prefix_bytes(num_sites);
  const long long a = 2ll * kmax * LDW;
  const long long st = 2ll * BM * LDW + 2ll * BM * (kmax + 8);
  if (smem_bytes <= 0 || pre + a >= smem_bytes) return 0;
  const long long S = (smem_bytes - pre - a) / st;
  return static_cast<int>(S < kMaxStages ? S : kMaxStages);
}

__device__ __forceinline__ int site_k(const adafuse_switch_site& s, int n_new, int n_all) {
  return (s.W_base ? n_new : n_all) * ((s.rank + 15) & ~15);
}

__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    default: cp_async_wait<4>(); break;  // kMaxStages - 2
  }
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Site of global tile `tile` and its origin (strip-major inside the site).
__device__ __forceinline__ int locate_tile(const int* s_prefix, const adafuse_switch_site* sites,
                                           int num_sites, int tile, int& o0, int& i0) {
  int lo = 0, hi = num_sites - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (s_prefix[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  const int tiles_o = (sites[lo].out_features + BM - 1) / BM;
  const int local = tile - s_prefix[lo];
  const int strip = local / tiles_o;
  o0 = (local - strip * tiles_o) * BM;
  i0 = strip * BN;
  return lo;
}

// kSkip (benchmark builds only, -DADAFUSE_DIAGNOSTICS; benchmarks/switch_bound.py): 1 skips
// the tensor-core product (A and B still staged, a zero delta added), 2 skips A, B, the product
// and the add (W tiles only stream through the same ring). Both write wrong weights by design;
// the shipped library instantiates kSkip = 0 alone.
template <typename T, int kSkip = 0>
__global__ void __launch_bounds__(kThreads, 2)
switch_resident_kernel(const adafuse_switch_site* __restrict__ sites, int num_sites, int max_out,
                 int max_in, const int32_t* __restrict__ new_ids, const float* __restrict__ new_gates,
                 const int32_t* __restrict__ old_ids, const float* __restrict__ old_gates, int top_k,
                 int smem_bytes, int smem_prev) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* s_prefix = reinterpret_cast<int*>(smem);  // [num_sites + 1]
  __shared__ int s_term_e[kMaxTerms];
  __shared__ float s_term_g[kMaxTerms];
  __shared__ int s_nterms, s_nall, s_kmax;
  __shared__ int s_warp[kThreads / 32];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  bool same = true;
  for (int j = 0; j < top_k; ++j) {
    const int a = new_ids[j], b = old_ids[j];
    if (a < 0 && b < 0) continue;
    if (a != b || __float_as_uint(new_gates[j]) != __float_as_uint(old_gates[j])) same = false;
  }
  if (same) return;  // uniform across the grid: nothing is written
  if (tid == 0) {
    int n = 0;
    for (int j = 0; j < top_k; ++j)
      if (new_ids[j] >= 0) { s_term_e[n] = new_ids[j]; s_term_g[n] = new_gates[j]; ++n; }
    s_nterms = n;
    for (int j = 0; j < top_k; ++j)
      if (old_ids[j] >= 0) { s_term_e[n] = old_ids[j]; s_term_g[n] = -old_gates[j]; ++n; }
    s_nall = n;
    s_kmax = 0;
    s_prefix[0] = 0;
  }
  __syncthreads();
  const int n_new = s_nterms, n_all = s_nall;
  int carry = 0, kmax = 0;
  for (int base = 0; base < num_sites; base += kThreads) {
    const int s = base + tid;
    int v = 0;
    if (s < num_sites) {
      v = site_tiles<T>(sites[s], max_out, max_in);
      if (v > 0) kmax = max(kmax, site_k(sites[s], n_new, n_all));
    }
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += u;
    }
    if (lane == 31) s_warp[warp] = v;
    __syncthreads();
    int before = 0, chunk_total = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      if (w < warp) before += s_warp[w];
      chunk_total += s_warp[w];
    }
    if (s < num_sites) s_prefix[s + 1] = carry + before + v;
    carry += chunk_total;
    __syncthreads();
  }
  if (kmax > 0) atomicMax(&s_kmax, kmax);
  __syncthreads();
  kmax = s_kmax;
  const int S = resident_stages(kmax, num_sites, smem_bytes);
  if (S < 2) return;                                                      // too large: later config
  if (smem_prev > 0 && resident_stages(kmax, num_sites, smem_prev) >= 2) return;  // earlier config ran
  const int total_tiles = s_prefix[num_sites];
  const int t_begin = static_cast<int>(static_cast<long long>(total_tiles) * blockIdx.x / gridDim.x);
  const int t_end = static_cast<int>(static_cast<long long>(total_tiles) * (blockIdx.x + 1) / gridDim.x);
  if (t_begin >= t_end) return;

  const int LDB = kmax + 8;
  T* sA = reinterpret_cast<T*>(smem + resident_prefix_bytes(num_sites));  // [kmax][LDW]
  unsigned char* stage0 = reinterpret_cast<unsigned char*>(sA + static_cast<size_t>(kmax) * LDW);
  const int stage_elems = BM * LDW + BM * LDB;
  auto stage_w = [&](int st) { return reinterpret_cast<T*>(stage0) + static_cast<size_t>(st) * stage_elems; };

  // producer: W tile and B rows of tile t into stage st (always commits a group)
  auto issue = [&](int t, int st) {
    if (t < t_end) {
      int o0, i0;
      const int si = locate_tile(s_prefix, sites, num_sites, t, o0, i0);
      const adafuse_switch_site& Sd = sites[si];
      const int out = Sd.out_features, in = Sd.in_features, rank = Sd.rank, E = Sd.num_experts;
      const T* src = static_cast<const T*>(Sd.W_base ? Sd.W_base : Sd.W);
      const T* Bg = static_cast<const T*>(Sd.B);
      const int rpad = (rank + 15) & ~15;
      const int K = (Sd.W_base ? n_new : n_all) * rpad;
      T* sW = stage_w(st);
      T* sB = sW + BM * LDW;
      const bool fp8 = Sd.base_dtype == ADAFUSE_WEIGHT_FP8_E4M3;
      const bool vec_w = (in % 8 == 0) && (fp8 ? aligned8(src) : aligned16(src));
      if (fp8) {  // 8 e4m3 bytes per vector, raw (converted where the delta is added)
        const uint8_t* src8 = static_cast<const uint8_t*>(Sd.W_base);
        uint8_t* sW8 = reinterpret_cast<uint8_t*>(sW);
#pragma unroll
        for (int m = 0; m < (BM * BN) / (kThreads * 8); ++m) {
          const int v = tid + kThreads * m;
          const int r = v >> 4, cc = (v & 15) << 3;
          const int row = o0 + r, col = i0 + cc;
          if (vec_w) {
            const bool ok = row < out && col < in;
            cp_async8(sW8 + r * LDW8 + cc, ok ? src8 + static_cast<size_t>(row) * in + col : src8, ok);
          } else {
            const int valid = row < out ? max(0, min(8, in - col)) : 0;
            uint2 x = make_uint2(0, 0);
            if (valid > 0) x = load_fp8x8(src8 + static_cast<size_t>(row) * in + col, false, valid);
            *reinterpret_cast<uint2*>(sW8 + r * LDW8 + cc) = x;
          }
        }
      } else {
#pragma unroll
        for (int m = 0; m < (BM * BN) / (kThreads * 8); ++m) {
          const int v = tid + kThreads * m;
          const int r = v >> 4, cc = (v & 15) << 3;
          const int row = o0 + r, col = i0 + cc;
          if (vec_w) {
            const bool ok = row < out && col < in;
            cp_async16(sW + r * LDW + cc, ok ? src + static_cast<size_t>(row) * in + col : src, ok);
          } else {
            const int valid = row < out ? max(0, min(8, in - col)) : 0;
            uint4 x = make_uint4(0, 0, 0, 0);
            if (valid > 0) x = load_raw<T>(src + static_cast<size_t>(row) * in + col, false, valid);
            *reinterpret_cast<uint4*>(sW + r * LDW + cc) = x;
          }
        }
      }
      if (kSkip != 2 && K > 0) {
        const bool vec_b = (rank % 8 == 0) && aligned16(Bg);
        const int kv = K >> 3;  // 8-element vectors per B row
        const int rv = rpad >> 3;
        for (int v = tid; v < BM * kv; v += kThreads) {
          const int o = v / kv, k8 = v - o * kv;
          const int term = k8 / rv;
          const int r = (k8 - term * rv) << 3;
          const int e = s_term_e[term];
          const bool ok = o0 + o < out && e < E && r < rank;
          T* dst = sB + o * LDB + (k8 << 3);
          const T* p = ok ? Bg + (static_cast<size_t>(e) * out + o0 + o) * rank + r : Bg;
          if (vec_b) {
            cp_async16(dst, p, ok);
          } else {
            uint4 x = make_uint4(0, 0, 0, 0);
            if (ok) x = load_raw<T>(p, false, min(8, rank - r));
            *reinterpret_cast<uint4*>(dst) = x;
          }
        }
      }
    }
    cp_async_commit();
  };

  for (int p = 0; p < S - 1; ++p) issue(t_begin + p, p);

  int res_site = -1, res_i0 = -1;
  const int wm = warp >> 2, wn = warp & 3, mi = lane >> 3;
  int st = 0;
  for (int t = t_begin; t < t_end; ++t) {
    cp_async_wait_dyn(S - 2);
    __syncthreads();  // tile t landed for every thread; stage of t-1 and sA are free
    int o0, i0;
    const int si = locate_tile(s_prefix, sites, num_sites, t, o0, i0);
    const adafuse_switch_site& Sd = sites[si];
    const int out = Sd.out_features, in = Sd.in_features, rank = Sd.rank, E = Sd.num_experts;
    const float scale = Sd.scale;
    const int rpad = (rank + 15) & ~15;
    const int K = (Sd.W_base ? n_new : n_all) * rpad;
    if (kSkip != 2 && (si != res_site || i0 != res_i0)) {  // new column strip: reload the resident A
      const T* Ag = static_cast<const T*>(Sd.A);
      const bool vec_a = (in % 8 == 0) && aligned16(Ag);
      for (int v = tid; v < K * (BN / 8); v += kThreads) {
        const int k = v >> 4, cc = (v & 15) << 3;
        const int term = k / rpad, r = k - term * rpad;
        const int e = s_term_e[term];
        const int col = i0 + cc;
        const bool ok = r < rank && e < E && col < in;
        const T* p = ok ? Ag + (static_cast<size_t>(e) * rank + r) * in + col : Ag;
        if (vec_a) {
          cp_async16(sA + k * LDW + cc, p, ok);
        } else {
          uint4 x = make_uint4(0, 0, 0, 0);
          if (ok) x = load_raw<T>(p, false, min(8, in - col));
          *reinterpret_cast<uint4*>(sA + k * LDW + cc) = x;
        }
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      res_site = si;
      res_i0 = i0;
    }
    issue(t + S - 1, st == 0 ? S - 1 : st - 1);  // into the stage freed by tile t-1

    T* sW = stage_w(st);
    const T* sB = sW + BM * LDW;
    float acc[2][4][4], tmp[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int c = 0; c < 4; ++c) { acc[a][b][c] = 0.f; tmp[a][b][c] = 0.f; }
    const int nks = kSkip ? 0 : K >> 4, ks_per_term = rpad >> 4;
    int cur_term = 0, in_term = 0;
    for (int ks = 0; ks < nks; ++ks) {
      if (in_term == ks_per_term) {  // term boundary (uniform): apply the coefficient in fp32
        const float c = scale * s_term_g[cur_term];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int q = 0; q < 4; ++q) { acc[a][b][q] = fmaf(c, tmp[a][b][q], acc[a][b][q]); tmp[a][b][q] = 0.f; }
        ++cur_term;
        in_term = 0;
      }
      ++in_term;
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int row = wm * 32 + mt * 16 + (mi & 1) * 8 + (lane & 7);
        ldmatrix_x4(af[mt], sB + row * LDB + ks * 16 + (mi >> 1) * 8);
      }
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int krow = ks * 16 + (mi & 1) * 8 + (lane & 7);
        uint32_t r4[4];
        ldmatrix_x4_trans(r4, sA + krow * LDW + wn * 32 + p * 16 + (mi >> 1) * 8);
        bf[2 * p][0] = r4[0]; bf[2 * p][1] = r4[1];
        bf[2 * p + 1][0] = r4[2]; bf[2 * p + 1][1] = r4[3];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) Mma<T>::run(tmp[mt][nt], af[mt], bf[nt]);
    }
    if (nks > 0) {
      const float c = scale * s_term_g[cur_term];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[a][b][q] = fmaf(c, tmp[a][b][q], acc[a][b][q]);
    }
    if (kSkip != 2 && Sd.base_dtype == ADAFUSE_WEIGHT_FP8_E4M3) {
      // acc += W8 * the row's scale (fma in fp32), every byte read before the tile becomes T
      const uint8_t* sW8 = reinterpret_cast<const uint8_t*>(sW);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int lr = wm * 32 + mt * 16 + (lane >> 2) + h * 8;
          const float rs = o0 + lr < out ? __ldg(Sd.base_scale + o0 + lr) : 0.f;
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            const int lc = wn * 32 + nt * 8 + (lane & 3) * 2;
            const float2 w = __half22float2(fp8x2_to_half2(*reinterpret_cast<const uint16_t*>(sW8 + lr * LDW8 + lc)));
            acc[mt][nt][2 * h] = fmaf(w.x, rs, acc[mt][nt][2 * h]);
            acc[mt][nt][2 * h + 1] = fmaf(w.y, rs, acc[mt][nt][2 * h + 1]);
          }
        }
      __syncthreads();
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int lr = wm * 32 + mt * 16 + (lane >> 2) + h * 8;
            const int lc = wn * 32 + nt * 8 + (lane & 3) * 2;
            *reinterpret_cast<uint32_t*>(sW + lr * LDW + lc) = pack2<T>(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
          }
    } else if (kSkip != 2) {
      // W tile (in shared memory) += delta, in the accumulator layout (conflict-free: LDW/2 = 4 mod 32)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int lr = wm * 32 + mt * 16 + (lane >> 2) + h * 8;
            const int lc = wn * 32 + nt * 8 + (lane & 3) * 2;
            uint32_t* q = reinterpret_cast<uint32_t*>(sW + lr * LDW + lc);
            const float2 f = unpack2<T>(*q);
            *q = pack2<T>(f.x + acc[mt][nt][2 * h], f.y + acc[mt][nt][2 * h + 1]);
          }
    }
    __syncthreads();
    T* W = static_cast<T*>(Sd.W);
    const bool vec_st = (in % 8 == 0) && aligned16(W);
#pragma unroll
    for (int m = 0; m < (BM * BN) / (kThreads * 8); ++m) {
      const int v = tid + kThreads * m;
      const int r = v >> 4, cc = (v & 15) << 3;
      const int row = o0 + r, col = i0 + cc;
      if (row < out && col < in)
        store_raw<T>(W + static_cast<size_t>(row) * in + col,
                     *reinterpret_cast<const uint4*>(sW + r * LDW + cc), vec_st, min(8, in - col));
    }
    st = (st + 1 == S) ? 0 : st + 1;
  }
  cp_async_wait<0>();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
switch_chunked_kernel(const adafuse_switch_site* __restrict__ sites, int num_sites, int max_out,
              int max_in, const int32_t* __restrict__ new_ids, const float* __restrict__ new_gates,
              const int32_t* __restrict__ old_ids, const float* __restrict__ old_gates, int top_k,
              int resident_smem) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  constexpr int V = TypeOps<T>::kVec;
  constexpr int NV = (BM * BN) / (kThreads * V);  // vectors of W per thread
  constexpr int VPR = BN / V;                      // vectors per tile row

  extern __shared__ __align__(16) unsigned char smem[];
  int* s_prefix = reinterpret_cast<int*>(smem);  // [num_sites + 1]
  unsigned char* tile_smem = smem + align_up_c(sizeof(int) * (num_sites + 1), 16);
  __shared__ int s_term_e[kMaxTerms];
  __shared__ float s_term_g[kMaxTerms];
  __shared__ int s_nterms;
  __shared__ int s_nall;
  __shared__ int s_kmax;
  __shared__ int s_warp[kThreads / 32];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // ---- no-op check and term list (route is the same for every site) -------
  bool same = true;
  for (int j = 0; j < top_k; ++j) {
    const int a = new_ids[j], b = old_ids[j];
    if (a < 0 && b < 0) continue;
    if (a != b || __float_as_uint(new_gates[j]) != __float_as_uint(old_gates[j])) same = false;
  }
  if (same) return;  // uniform across the grid: nothing is written
  if (tid == 0) {
    int n = 0;
    for (int j = 0; j < top_k; ++j) {
      if (new_ids[j] >= 0) { s_term_e[n] = new_ids[j]; s_term_g[n] = new_gates[j]; ++n; }
    }
    s_nterms = n;  // pristine sites use only the first n_new terms
    for (int j = 0; j < top_k; ++j) {
      if (old_ids[j] >= 0) { s_term_e[n] = old_ids[j]; s_term_g[n] = -old_gates[j]; ++n; }
    }
    s_nall = n;  // total terms (in place)
    s_kmax = 0;
  }

  // ---- prefix sum of tiles over sites ---------------------------------------
  if (tid == 0) s_prefix[0] = 0;
  int carry = 0;
  for (int base = 0; base < num_sites; base += kThreads) {
    const int s = base + tid;
    int v = (s < num_sites) ? site_tiles<T>(sites[s], max_out, max_in) : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += u;
    }
    if (lane == 31) s_warp[warp] = v;
    __syncthreads();
    int before = 0;
    for (int w = 0; w < warp; ++w) before += s_warp[w];
    int chunk_total = 0;
    for (int w = 0; w < kThreads / 32; ++w) chunk_total += s_warp[w];
    if (s < num_sites) s_prefix[s + 1] = carry + before + v;
    carry += chunk_total;
    __syncthreads();
  }
  __syncthreads();
  const int total_tiles = s_prefix[num_sites];
  const int n_new = s_nterms;
  const int n_all = s_nall;
  if (resident_smem > 0) {  // fp16/bf16: run only where the resident kernel (its largest config) could not
    int kmax = 0;
    for (int s = tid; s < num_sites; s += kThreads)
      if (site_tiles<T>(sites[s], max_out, max_in) > 0) kmax = max(kmax, site_k(sites[s], n_new, n_all));
    if (kmax > 0) atomicMax(&s_kmax, kmax);
    __syncthreads();
    if (resident_stages(s_kmax, num_sites, resident_smem) >= 2) return;
  }

  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    // locate the site: last s with prefix[s] <= tile
    int lo = 0, hi = num_sites - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (s_prefix[mid] <= tile) lo = mid; else hi = mid - 1;
    }
    const adafuse_switch_site& S = sites[lo];
    const int out = S.out_features, in = S.in_features, rank = S.rank, E = S.num_experts;
    const float scale = S.scale;
    T* W = static_cast<T*>(S.W);
    const T* src = S.W_base ? static_cast<const T*>(S.W_base) : W;
    const T* Ag = static_cast<const T*>(S.A);
    const T* Bg = static_cast<const T*>(S.B);
    const int nterms = S.W_base ? n_new : n_all;
    const int local = tile - s_prefix[lo];
    const int tiles_i = (in + BN - 1) / BN;
    const int o0 = (local / tiles_i) * BM, i0 = (local % tiles_i) * BN;
    const bool fp8 = !kF32 && S.base_dtype == ADAFUSE_WEIGHT_FP8_E4M3;  // V = 8: 8 e4m3 bytes a vector
    const bool vec_w = (in % V == 0) && aligned16(W);
    const bool vec_src = (in % V == 0) && (fp8 ? aligned8(src) : aligned16(src));
    const bool vec_a = (in % V == 0) && aligned16(Ag);
    const bool vec_b = (rank % 8 == 0) && aligned16(Bg);

    // 1. W tile into registers (issued before the delta work to overlap); FP8: raw in .x, .y
    uint4 wreg[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int v = tid + kThreads * k;
      const int row = o0 + v / VPR, col = i0 + (v % VPR) * V;
      const int valid = (row < out) ? max(0, min(V, in - col)) : 0;
      wreg[k] = make_uint4(0, 0, 0, 0);
      if (valid > 0 && fp8) {
        const uint2 b = load_fp8x8(static_cast<const uint8_t*>(S.W_base) + static_cast<size_t>(row) * in + col,
                                   vec_src, valid);
        wreg[k].x = b.x;
        wreg[k].y = b.y;
      } else if (valid > 0) {
        wreg[k] = load_raw<T>(src + static_cast<size_t>(row) * in + col, vec_src, valid);
      }
    }

    if constexpr (kF32) {
      // ---- SIMT fp32: thread owns rows warp + 8m, cols lane*4..+3 ----------
      float* sB = reinterpret_cast<float*>(tile_smem);                       // [BM][LDB32]
      float* sA = reinterpret_cast<float*>(tile_smem + align_up_c(sizeof(float) * BM * LDB32, 16));  // [KS32][BN]
      float acc[NV][4];
#pragma unroll
      for (int m = 0; m < NV; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][c] = 0.f;
      const int total_k = nterms * rank;
      for (int k0 = 0; k0 < total_k; k0 += KS32) {
        {  // sB: c * B[e][o0 + o][r]
          const int kk = tid & (KS32 - 1);
          const int kg = k0 + kk;
          const int term = kg / rank, r = kg - term * rank;
          const bool kv = kg < total_k && s_term_e[term] < E;
          const int e = kv ? s_term_e[term] : 0;
          const float c = kv ? scale * s_term_g[term] : 0.f;
          // all loads first, then the shared-memory stores: interleaving them
          // serialises the L2 round trips (the compiler cannot prove no alias)
          constexpr int NB = (BM * KS32) / kThreads;
          float bv[NB];
#pragma unroll
          for (int m = 0; m < NB; ++m) {
            const int o = (tid / KS32) + (kThreads / KS32) * m;
            bv[m] = (kv && o0 + o < out) ? __ldg(&Bg[(static_cast<size_t>(e) * out + o0 + o) * rank + r]) : 0.f;
          }
          constexpr int NA = (KS32 * BN) / (kThreads * 4);
          uint4 av[NA];
#pragma unroll
          for (int m = 0; m < NA; ++m) {  // A[e][r][i0 + i]
            const int v = tid + kThreads * m;
            const int kk2 = v / (BN / 4), col = (v % (BN / 4)) * 4;
            const int kg2 = k0 + kk2;
            const int term2 = kg2 / rank, r2 = kg2 - term2 * rank;
            const bool kv2 = kg2 < total_k && s_term_e[term2] < E;
            const int valid = kv2 ? max(0, min(4, in - (i0 + col))) : 0;
            av[m] = make_uint4(0, 0, 0, 0);
            if (valid > 0)
              av[m] = load_raw<T>(Ag + (static_cast<size_t>(s_term_e[term2]) * rank + r2) * in + i0 + col, vec_a, valid);
          }
#pragma unroll
          for (int m = 0; m < NB; ++m) sB[((tid / KS32) + (kThreads / KS32) * m) * LDB32 + kk] = c * bv[m];
#pragma unroll
          for (int m = 0; m < NA; ++m) {
            const int v = tid + kThreads * m;
            *reinterpret_cast<uint4*>(sA + (v / (BN / 4)) * BN + (v % (BN / 4)) * 4) = av[m];
          }
        }
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < KS32; ++kk) {
          const float4 a = *reinterpret_cast<const float4*>(sA + kk * BN + lane * 4);
#pragma unroll
          for (int m = 0; m < NV; ++m) {
            const float b = sB[(warp + 8 * m) * LDB32 + kk];
            acc[m][0] = fmaf(b, a.x, acc[m][0]);
            acc[m][1] = fmaf(b, a.y, acc[m][1]);
            acc[m][2] = fmaf(b, a.z, acc[m][2]);
            acc[m][3] = fmaf(b, a.w, acc[m][3]);
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int v = tid + kThreads * k;  // row = warp + 8k, col = lane*4
        const int row = o0 + v / VPR, col = i0 + (v % VPR) * V;
        const int valid = (row < out) ? max(0, min(V, in - col)) : 0;
        if (valid > 0) {
          float f[4];
          unpack16<float>(wreg[k], f);
#pragma unroll
          for (int c = 0; c < 4; ++c) f[c] += acc[k][c];
          store_raw<T>(W + static_cast<size_t>(row) * in + col, pack16<float>(f), vec_w, valid);
        }
      }
    } else {
      // ---- tensor cores for fp16 / bf16 ----------------------------------------
      T* sB = reinterpret_cast<T*>(tile_smem);                                       // [BM][LDB16]
      T* sA = reinterpret_cast<T*>(tile_smem + align_up_c(sizeof(T) * BM * LDB16, 16));  // [KS16][LDA16]
      float* sD = reinterpret_cast<float*>(tile_smem);                               // [BM][LDD]
      const int wm = warp >> 2, wn = warp & 3;
      const int rpad = (rank + 15) & ~15;
      const int total_k = nterms * rpad;
      float acc[2][4][4], tmp[2][4][4];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
          for (int c = 0; c < 4; ++c) { acc[a][b][c] = 0.f; tmp[a][b][c] = 0.f; }
      int cur_term = 0;
      for (int k0 = 0; k0 < total_k; k0 += KS16) {
        {  // sB: B[e][o0 + o][r]  (k fixed per thread)
          const int kk = tid & (KS16 - 1);
          const int kg = k0 + kk;
          const int term = kg / rpad, r = kg - term * rpad;
          const bool kv = kg < total_k && r < rank && s_term_e[term] < E;
          const int e = kv ? s_term_e[term] : 0;
          const uint16_t* Bq = reinterpret_cast<const uint16_t*>(Bg);
          uint16_t* sBq = reinterpret_cast<uint16_t*>(sB);
          if (vec_b) {  // cp.async: 64 rows x 8 vectors of 8 k
#pragma unroll
            for (int m = 0; m < (BM * KS16) / (kThreads * 8); ++m) {
              const int v = tid + kThreads * m;
              const int o = v / (KS16 / 8), kv8 = (v % (KS16 / 8)) * 8;
              const int kg2 = k0 + kv8;
              const int term2 = kg2 / rpad, r2 = kg2 - term2 * rpad;
              const bool ok = kg2 < total_k && r2 < rank && s_term_e[term2] < E && o0 + o < out;
              const T* srcp = ok ? Bg + (static_cast<size_t>(s_term_e[term2]) * out + o0 + o) * rank + r2 : Bg;
              cp_async16(sB + o * LDB16 + kv8, srcp, ok);
            }
          } else {
#pragma unroll 4
            for (int m = 0; m < (BM * KS16) / kThreads; ++m) {
              const int o = (tid / KS16) + (kThreads / KS16) * m;
              sBq[o * LDB16 + kk] = (kv && o0 + o < out)
                  ? Bq[(static_cast<size_t>(e) * out + o0 + o) * rank + r] : static_cast<uint16_t>(0);
            }
          }
        }
#pragma unroll
        for (int m = 0; m < (KS16 * BN) / (kThreads * 8); ++m) {  // sA: A[e][r][i0 + i]
          const int v = tid + kThreads * m;
          const int kk2 = v / (BN / 8), col = (v % (BN / 8)) * 8;
          const int kg2 = k0 + kk2;
          const int term2 = kg2 / rpad, r2 = kg2 - term2 * rpad;
          const bool kv2 = kg2 < total_k && r2 < rank && s_term_e[term2] < E;
          const int valid = kv2 ? max(0, min(8, in - (i0 + col))) : 0;
          if (vec_a) {
            const T* srcp = valid == 8 ? Ag + (static_cast<size_t>(s_term_e[term2]) * rank + r2) * in + i0 + col : Ag;
            cp_async16(sA + kk2 * LDA16 + col, srcp, valid == 8);
          } else {
            uint4 a = make_uint4(0, 0, 0, 0);
            if (valid > 0)
              a = load_raw<T>(Ag + (static_cast<size_t>(s_term_e[term2]) * rank + r2) * in + i0 + col, false, valid);
            *reinterpret_cast<uint4*>(sA + kk2 * LDA16 + col) = a;
          }
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < KS16 / 16; ++ks) {
          const int kg = k0 + ks * 16;
          if (kg >= total_k) break;
          const int term = kg / rpad;  // uniform
          if (term != cur_term) {
            const float c = scale * s_term_g[cur_term];
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
              for (int b = 0; b < 4; ++b)
#pragma unroll
                for (int q = 0; q < 4; ++q) { acc[a][b][q] = fmaf(c, tmp[a][b][q], acc[a][b][q]); tmp[a][b][q] = 0.f; }
            cur_term = term;
          }
          uint32_t af[2][4], bf[4][2];
          const int mi = lane >> 3;
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            const int row = wm * 32 + mt * 16 + (mi & 1) * 8 + (lane & 7);
            const int col = ks * 16 + (mi >> 1) * 8;
            ldmatrix_x4(af[mt], sB + row * LDB16 + col);
          }
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            const int krow = ks * 16 + (mi & 1) * 8 + (lane & 7);
            const int col = wn * 32 + p * 16 + (mi >> 1) * 8;
            uint32_t r4[4];
            ldmatrix_x4_trans(r4, sA + krow * LDA16 + col);
            bf[2 * p][0] = r4[0]; bf[2 * p][1] = r4[1];
            bf[2 * p + 1][0] = r4[2]; bf[2 * p + 1][1] = r4[3];
          }
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) Mma<T>::run(tmp[mt][nt], af[mt], bf[nt]);
        }
        __syncthreads();
      }
      if (total_k > 0) {
        const float c = scale * s_term_g[cur_term];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[a][b][q] = fmaf(c, tmp[a][b][q], acc[a][b][q]);
      }
      // stage the delta tile through shared memory (sD aliases sA/sB: the
      // loop above ended with a barrier)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = wm * 32 + mt * 16 + (lane >> 2) + h * 8;
            const int col = wn * 32 + nt * 8 + (lane & 3) * 2;
            *reinterpret_cast<float2*>(sD + row * LDD + col) =
                make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
          }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int v = tid + kThreads * k;
        const int lr = v / VPR, lc = (v % VPR) * V;
        const int row = o0 + lr, col = i0 + lc;
        const int valid = (row < out) ? max(0, min(V, in - col)) : 0;
        if (valid > 0) {
          const float4 d0 = *reinterpret_cast<const float4*>(sD + lr * LDD + lc);
          const float4 d1 = *reinterpret_cast<const float4*>(sD + lr * LDD + lc + 4);
          const float d[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
          float f[8];
          if (fp8) {  // W8 * the row's scale + delta, one fma
            unpack8_fp8(make_uint2(wreg[k].x, wreg[k].y), f);
            const float rs = __ldg(S.base_scale + row);
#pragma unroll
            for (int c = 0; c < 8; ++c) f[c] = fmaf(f[c], rs, d[c]);
          } else {
            unpack16<T>(wreg[k], f);
#pragma unroll
            for (int c = 0; c < 8; ++c) f[c] += d[c];
          }
          store_raw<T>(W + static_cast<size_t>(row) * in + col, pack16<T>(f), vec_w, valid);
        }
      }
      __syncthreads();  // sD is overwritten by the next tile's operands
    }
  }
}

__global__ void update_old_kernel(const int32_t* new_ids, const float* new_gates, int32_t* old_ids,
                                  float* old_gates, int top_k) {
  const int j = threadIdx.x;
  if (j < top_k) {
    old_ids[j] = new_ids[j];
    old_gates[j] = new_gates[j];
  }
}

// What launch_switch needs from the CUDA runtime (function attributes, occupancy),
// computed once per (device, dtype, num_sites) and cached: an enqueue must not query
// them each call. The dynamic shared memory opt-ins are set in the same step.
struct SwitchPlan {
  int num_sites = -1;  // -1: not computed yet
  size_t smem = 0;     // chunked kernel: dynamic shared memory
  int grid = 0;        // chunked kernel: blocks (occupancy x SMs)
  int smem_a = 0, blocks_a = 0;  // resident kernel at 2 blocks/SM (16-bit dtypes only)
  int smem_b = 0, blocks_b = 0;  // resident kernel at 1 block/SM
};

template <typename T>
int make_switch_plan(const DeviceInfo& di, int num_sites, SwitchPlan* plan) {
  SwitchPlan p;
  p.num_sites = num_sites;
  p.smem = align_up(sizeof(int) * (static_cast<size_t>(num_sites) + 1), 16) + tile_smem_bytes<T>();
  const size_t static_smem = 1024;  // term table and scan scratch, generous
  if (p.smem + static_smem > static_cast<size_t>(di.max_smem_optin)) return ADAFUSE_ERR_INVALID_ARGUMENT;
  auto kern = switch_chunked_kernel<T>;
  if (p.smem > 48 * 1024)
    AF_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem)));
  int per_sm = 0;
  AF_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, kThreads, p.smem));
  if (per_sm < 1) return ADAFUSE_ERR_CUDA;
  p.grid = per_sm * di.sm_count;
  if constexpr (!std::is_same<T, float>::value) {
    // The resident kernel in two shared-memory configurations: 2 blocks/SM (half the SM's shared
    // memory each), then 1 block/SM (all of it); the kernels decide on the device
    // (from the largest K = terms x rank16) which one runs, and the chunked one only where
    // neither fits.
    auto k3 = switch_resident_kernel<T>;
    cudaFuncAttributes fa;
    AF_CUDA_TRY(cudaFuncGetAttributes(&fa, k3));
    const int stat = static_cast<int>(fa.sharedSizeBytes);
    p.smem_a = (di.smem_per_sm / 2 - di.reserved_smem_per_block - stat) & ~127;
    p.smem_b = (min(di.max_smem_optin, di.smem_per_sm - di.reserved_smem_per_block) - stat) & ~127;
    AF_CUDA_TRY(cudaFuncSetAttribute(k3, cudaFuncAttributeMaxDynamicSharedMemorySize, p.smem_b));
#ifdef ADAFUSE_DIAGNOSTICS
    AF_CUDA_TRY(cudaFuncSetAttribute(switch_resident_kernel<T, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, p.smem_b));
    AF_CUDA_TRY(cudaFuncSetAttribute(switch_resident_kernel<T, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, p.smem_b));
#endif
    int pa = 0, pb = 0;
    AF_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&pa, k3, kThreads, p.smem_a));
    AF_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&pb, k3, kThreads, p.smem_b));
    p.blocks_a = pa * di.sm_count;
    p.blocks_b = pb * di.sm_count;
  }
  *plan = p;
  return ADAFUSE_OK;
}

// One cached plan per (device, dtype); recomputed when num_sites changes (a caller
// normally keeps one site table, so in practice once).
template <typename T>
int switch_plan(const DeviceInfo& di, int num_sites, SwitchPlan* out) {
  static std::mutex mu;
  static SwitchPlan plans[kMaxDevices];
  if (di.device < 0 || di.device >= kMaxDevices) return make_switch_plan<T>(di, num_sites, out);
  std::lock_guard<std::mutex> lock(mu);
  SwitchPlan& p = plans[di.device];
  if (p.num_sites != num_sites) {
    const int st = make_switch_plan<T>(di, num_sites, &p);
    if (st != ADAFUSE_OK) {
      p.num_sites = -1;
      return st;
    }
  }
  *out = p;
  return ADAFUSE_OK;
}

// The kernel sequence of one switch: adafuse_switch runs kDefault; the others exist for
// adafuse_switch_diagnostic (benchmark builds, adafuse_switch_variant).
enum class Sequence { kDefault = 0, kChunked = 1, kResident2pb = 2, kNoMma = 3, kNoDelta = 4 };

template <typename T>
int launch_switch(Sequence seq, const adafuse_switch_site* sites, int num_sites, int max_out, int max_in,
                  const int32_t* new_ids, const float* new_gates, int32_t* old_ids,
                  float* old_gates, int top_k, cudaStream_t stream) {
  DeviceInfo di;
  int st = device_info(stream, &di);
  if (st != ADAFUSE_OK) return st;
  SwitchPlan plan;
  st = switch_plan<T>(di, num_sites, &plan);
  if (st != ADAFUSE_OK) return st;
  int resident_smem = 0;
  if constexpr (!std::is_same<T, float>::value) {
    auto k3 = switch_resident_kernel<T>;
#ifdef ADAFUSE_DIAGNOSTICS
    if (seq == Sequence::kNoMma) k3 = switch_resident_kernel<T, 1>;
    if (seq == Sequence::kNoDelta) k3 = switch_resident_kernel<T, 2>;
#endif
    const bool resident = seq != Sequence::kChunked, resident_1pb = resident && seq != Sequence::kResident2pb;
    const int smem_a = plan.smem_a, smem_b = plan.smem_b;
    int prev = 0;
    if (resident && plan.blocks_a >= 1 && smem_a > 0) {
      k3<<<plan.blocks_a, kThreads, smem_a, stream>>>(sites, num_sites, max_out, max_in, new_ids,
                                                       new_gates, old_ids, old_gates, top_k, smem_a, 0);
      AF_LAUNCH_CHECK();
      prev = smem_a;
    }
    if (resident_1pb && plan.blocks_b >= 1 && smem_b > smem_a) {
      k3<<<plan.blocks_b, kThreads, smem_b, stream>>>(sites, num_sites, max_out, max_in, new_ids,
                                                       new_gates, old_ids, old_gates, top_k, smem_b, prev);
      AF_LAUNCH_CHECK();
      prev = smem_b;
    }
    resident_smem = prev;
  }
  switch_chunked_kernel<T><<<plan.grid, kThreads, plan.smem, stream>>>(sites, num_sites, max_out, max_in, new_ids,
                                                              new_gates, old_ids, old_gates, top_k, resident_smem);
  AF_LAUNCH_CHECK();
  return ADAFUSE_OK;
}

}  // namespace
}  // namespace adafuse

namespace adafuse {
namespace {
int run_switch(Sequence seq, adafuse_dtype dtype, const adafuse_switch_site* sites, int num_sites,
               int max_out_features, int max_in_features, const int32_t* new_ids, const float* new_gates,
               int32_t* old_ids, float* old_gates, int top_k, int update_old, cudaStream_t stream) {
  if (!valid_dtype(dtype)) return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (num_sites < 0 || num_sites > ADAFUSE_SWITCH_MAX_SITES || top_k < 1 || top_k > kMaxTopK)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (max_out_features < 1 || max_in_features < 1) return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (!new_ids || !new_gates || !old_ids || !old_gates) return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (num_sites > 0 && !sites) return ADAFUSE_ERR_INVALID_ARGUMENT;
  if (num_sites > 0) {
    int st = ADAFUSE_ERR_INVALID_ARGUMENT;
    switch (dtype) {
      case ADAFUSE_FLOAT32:
        st = launch_switch<float>(seq, sites, num_sites, max_out_features, max_in_features, new_ids,
                                  new_gates, old_ids, old_gates, top_k, stream);
        break;
      case ADAFUSE_FLOAT16:
        st = launch_switch<__half>(seq, sites, num_sites, max_out_features, max_in_features, new_ids,
                                   new_gates, old_ids, old_gates, top_k, stream);
        break;
      case ADAFUSE_BFLOAT16:
        st = launch_switch<__nv_bfloat16>(seq, sites, num_sites, max_out_features, max_in_features,
                                          new_ids, new_gates, old_ids, old_gates, top_k, stream);
        break;
    }
    if (st != ADAFUSE_OK) return st;
  }
  if (update_old) {
    update_old_kernel<<<1, 32, 0, stream>>>(new_ids, new_gates, old_ids, old_gates, top_k);
    AF_LAUNCH_CHECK();
  }
  return ADAFUSE_OK;
}
}  // namespace
}  // namespace adafuse

extern "C" int adafuse_switch_check_site(adafuse_dtype dtype, const adafuse_switch_site* site) {
  if (!adafuse::valid_dtype(dtype) || !site) return ADAFUSE_ERR_INVALID_ARGUMENT;
  return adafuse::site_base_valid(dtype != ADAFUSE_FLOAT32, *site) ? ADAFUSE_OK : ADAFUSE_ERR_INVALID_ARGUMENT;
}

extern "C" int adafuse_switch(adafuse_dtype dtype, const adafuse_switch_site* sites, int num_sites,
                              int max_out_features, int max_in_features, const int32_t* new_ids,
                              const float* new_gates, int32_t* old_ids, float* old_gates, int top_k,
                              int update_old, cudaStream_t stream) {
  return adafuse::run_switch(adafuse::Sequence::kDefault, dtype, sites, num_sites, max_out_features,
                             max_in_features, new_ids, new_gates, old_ids, old_gates, top_k, update_old, stream);
}

#ifdef ADAFUSE_DIAGNOSTICS
extern "C" int adafuse_switch_diagnostic(int variant, adafuse_dtype dtype, const adafuse_switch_site* sites,
                                         int num_sites, int max_out_features, int max_in_features,
                                         const int32_t* new_ids, const float* new_gates, int32_t* old_ids,
                                         float* old_gates, int top_k, int update_old, cudaStream_t stream) {
  if (variant < ADAFUSE_SWITCH_VARIANT_DEFAULT || variant > ADAFUSE_SWITCH_VARIANT_NO_DELTA)
    return ADAFUSE_ERR_INVALID_ARGUMENT;
  static_assert(static_cast<int>(adafuse::Sequence::kNoDelta) == ADAFUSE_SWITCH_VARIANT_NO_DELTA &&
                    static_cast<int>(adafuse::Sequence::kChunked) == ADAFUSE_SWITCH_VARIANT_CHUNKED &&
                    static_cast<int>(adafuse::Sequence::kResident2pb) == ADAFUSE_SWITCH_VARIANT_RESIDENT_2PB &&
                    static_cast<int>(adafuse::Sequence::kNoMma) == ADAFUSE_SWITCH_VARIANT_NO_MMA,
                "Sequence mirrors adafuse_switch_variant");
  return adafuse::run_switch(static_cast<adafuse::Sequence>(variant), dtype, sites, num_sites, max_out_features,
                             max_in_features, new_ids, new_gates, old_ids, old_gates, top_k, update_old, stream);
}
#endif
