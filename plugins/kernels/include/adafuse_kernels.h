// adafuse_kernels.h - C ABI of the AdaFuse fused adapter kernels.
//
// Used by the TensorRT plugins (plugins/<name>Plugin/), the torch GPU runner
// (through ctypes) and the tests. Every pointer is a device pointer unless
// stated otherwise; every matrix is row-major and contiguous. All functions
// only enqueue work on `stream` (no host synchronisation), so they can be
// captured in CUDA graphs. They return 0 on success or an adafuse_status code.
// Device properties are those of the stream's device (cudaStreamGetDevice; the current
// device while the stream is being captured, where CUDA refuses that query), looked up
// once per device; adafuse_switch caches its occupancy and function-attribute queries
// per device and dtype (the first call on a device makes them: make it outside capture).
// Nothing here reads the environment: every choice is an argument (adafuse_lora_options).
//
// Toolkit and driver floor: the library calls cudaStreamGetDevice, so it builds with CUDA >= 12.8
// only, and runs on a driver that supports the CUDA version it was built with, at least 12.8:
// NVIDIA driver r570 or newer for a CUDA 12.8 / 12.9 build, r580 or newer for a CUDA 13.x build.
// adafuse_check_runtime() compares the installed driver with that floor; the Python binding and
// the TensorRT plugin library call it when they load.
#ifndef ADAFUSE_KERNELS_H
#define ADAFUSE_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// 2: adafuse_lora_linear takes adafuse_lora_options; the driver checks.
// 3: adafuse_lora_options names the base weight's storage (weight_dtype, weight_scale): FP8 weights.
// 4: adafuse_switch_site names its W_base's storage (base_dtype, base_scale; 64 bytes): FP8 switch bases.
#define ADAFUSE_KERNELS_ABI_VERSION 4

// Limits checked by the functions below (a call beyond them returns
// ADAFUSE_ERR_INVALID_ARGUMENT). Additive constants; the ABI is unchanged.
#define ADAFUSE_MAX_TOP_K 8                 // top_k of adafuse_lora_linear and adafuse_switch
#define ADAFUSE_LORA_MAX_EXPERTS 256        // num_experts of adafuse_lora_linear
#define ADAFUSE_LORA_MAX_RANK 4096          // rank of adafuse_lora_linear
#define ADAFUSE_SWITCH_MAX_SITES (1 << 20)  // num_sites of adafuse_switch (also bounded by shared
                                            // memory: 4 bytes per site + the tile buffers)
// Rows of one adafuse_lora_linear call: every (top_k, num_experts) within the limits above
// accepts up to this many (the many-rows GEMMs need ceil(rows/64) <= 65535 grid rows).
// Larger inputs are processed in row chunks by the caller (rows are independent).
#define ADAFUSE_LORA_MAX_ROWS (1 << 17)
// adafuse_switch has no limit on rank or num_experts; a site with a non-positive size or
// out/in above max_out_features/max_in_features is skipped (left untouched).

typedef enum {
  ADAFUSE_FLOAT32 = 0,
  ADAFUSE_FLOAT16 = 1,
  ADAFUSE_BFLOAT16 = 2
} adafuse_dtype;

typedef enum {
  ADAFUSE_OK = 0,
  ADAFUSE_ERR_INVALID_ARGUMENT = 1,  // a size, pointer or dtype is out of range
  ADAFUSE_ERR_WORKSPACE = 2,         // workspace missing or too small
  ADAFUSE_ERR_CUDA = 3,              // a CUDA call or launch failed
  ADAFUSE_ERR_NO_DRIVER = 4,         // no CUDA driver found (adafuse_check_runtime)
  ADAFUSE_ERR_DRIVER_TOO_OLD = 5     // the driver is older than this build needs (adafuse_check_runtime)
} adafuse_status;

const char* adafuse_status_string(int status);
int adafuse_abi_version(void);

// ---- Driver floor ---------------------------------------------------------------
// The lowest driver this build runs on, in cudaDriverGetVersion's encoding (1000 * major +
// 10 * minor): max(12.8, <major version the library was built with>.0).
int adafuse_required_driver_version(void);
// Compares a driver version (cudaDriverGetVersion's encoding; 0 = no driver) with that floor and
// writes one line naming both, the CUDA version of the build and the NVIDIA driver branch into
// msg (msg_len bytes, NUL-terminated when msg_len > 0; msg may be NULL when msg_len is 0).
// Returns ADAFUSE_OK, ADAFUSE_ERR_NO_DRIVER or ADAFUSE_ERR_DRIVER_TOO_OLD. Needs no GPU.
int adafuse_check_driver_version(int driver_version, char* msg, size_t msg_len);
// The same for the installed driver (cudaDriverGetVersion, which reports 0 without one);
// ADAFUSE_ERR_CUDA, with the CUDA error named, when the query itself fails. Needs no GPU.
int adafuse_check_runtime(char* msg, size_t msg_len);

// ---- Routed fused linear --------------------------------------------------
// y[n] = W x[n] (+ bias) + scale * sum_j gates[n,j] * B[e] (A[e] x[n]),
//   e = expert_ids[n,j], for every row n in [0, rows).
// x [rows, in], W [out, in], bias [out] or NULL, A [E, rank, in],
// B [E, out, rank], expert_ids [rows, top_k] int32 (each in [0, E)),
// gates [rows, top_k] float32, y [rows, out]. x, W, bias, A, B, y share dtype (W: unless
// adafuse_lora_options::weight_dtype says FP8, below).
// Few rows (<= 16): one GEMV-class pass over W. Many rows: one tensor-core GEMM over
// [x | z] and [W | B_cat] (K = in + E*rank), z = the gated, scaled shrink x A[e]^T of every
// expert, zero where a row does not use the expert (the experts' share of the work grows with
// E*rank / in).
// Workspace (adafuse_lora_linear_workspace_size, 16-byte aligned), each part rounded up to 256
// bytes: rows <= 16: fp32 [rows, top_k, rank], then a 16-byte flag; rows > 16: z [rows,
// round_up(E*rank, 8)] sized at 4 bytes per element, fp32 shrink partials [splits, rows, E*rank],
// then, when the final
// GEMM of <= 64 rows is split over K (ysplits > 1), its fp32 partials [ysplits, min(rows, 64),
// out]; never less than the rows <= 16 formula. splits and ysplits follow from in_features,
// out_features and E*rank only, so the size never decreases as rows grow (size once for the
// largest row count); it does not depend on dtype. Sizes outside the limits above (rows beyond
// ADAFUSE_LORA_MAX_ROWS included) give 0.
// A and B both NULL: no adapter, y = W x (+ bias), at any row count: the few-rows kernels up to 16
// rows, above that the many-rows GEMM with K = in only (no shrink, no z): the dense projections and
// the LM head. expert_ids, gates and scale are then ignored; num_experts, rank and top_k must still
// be valid and size the workspace (adafuse_lora_linear_workspace_size with them, e.g. 1, 1, 1, is
// enough: without an adapter only its split-K partials part is used, never more than with one).
//
// Few rows on sm_90: the kernels are programmatic dependents (PDL) of the stream's previous
// kernel: they launch while it finishes, and read nothing it may write, and write nothing, before
// it has completed (griddepcontrol.wait), with one exception: the one-row shrink with
// exclusive_workspace set (below). PDL is used only where the kernel's code on the device was
// compiled for sm_90+ (cudaFuncGetAttributes' ptxVersion): a library built for sm_80 alone has no
// griddepcontrol.wait in its code and never launches early, also on a Hopper GPU.
// One row: the shrink raises a flag in the workspace that starts the GEMV's W stream, so one
// workspace serves one call in flight at a time.
typedef enum {
  ADAFUSE_PDL_AUTO = 0,  // PDL where the device and the kernel's compiled code are sm_90+
  ADAFUSE_PDL_OFF = 1    // every kernel of the call in stream order (A/B timing)
} adafuse_pdl_mode;
// The one-row GEMV's shape: 16-byte W loads in flight per lane (U), rows per warp (N), warps per
// row (K). AUTO: U4K2 for out >= 8192, else U4N1, and the SIMT GEMV above 96 LoRA pairs
// (top_k * rank), by measurement on the H200 (benchmarks/results/gemv_sites.json).
typedef enum {
  ADAFUSE_GEMV1_AUTO = 0,
  ADAFUSE_GEMV1_U4N1 = 1,
  ADAFUSE_GEMV1_U8N1 = 2,
  ADAFUSE_GEMV1_U4N2 = 3,
  ADAFUSE_GEMV1_U4K2 = 4,
  ADAFUSE_GEMV1_SIMT = 5  // the warp-per-row SIMT GEMV (the 2-16 rows fallback), at one row
} adafuse_gemv1_shape;
// The few-rows shrink outside the one-row GEMV path (which needs the block-per-dot shrink's
// flag). AUTO: block per dot at one row, warp per dot at 2-16 rows (benchmarks/results/shrink_ab.log).
typedef enum {
  ADAFUSE_SHRINK_AUTO = 0,
  ADAFUSE_SHRINK_DOT = 1,   // one block per (row, expert slot, rank) dot product
  ADAFUSE_SHRINK_WARP = 2   // one warp per dot product
} adafuse_shrink_kind;
// Storage of adafuse_lora_linear's base weight W (adafuse_lora_options::weight_dtype).
typedef enum {
  ADAFUSE_WEIGHT_AS_DTYPE = 0,  // W has the call's dtype; weight_scale must be NULL
  // W is float8 e4m3 (__nv_fp8_e4m3, one byte each) [out, in] with per-output-channel float32
  // scales weight_scale[out] (device): y[n, o] = (sum_i x[n, i] W[o, i]) * weight_scale[o]
  // (+ bias) + the LoRA term, accumulated in float32 (W8A16: x, bias, A, B and y keep dtype).
  // Needs dtype FLOAT16 or BFLOAT16, in_features % 16 == 0 and 16-byte aligned x and W; other
  // calls give ADAFUSE_ERR_INVALID_ARGUMENT. Every path reads W as one byte per element (the
  // many-rows GEMM converts its W tiles to dtype in shared memory, exactly: dtype holds every
  // e4m3 value). sm_89+ converts with cvt, older GPUs with integer arithmetic (same values).
  ADAFUSE_WEIGHT_FP8_E4M3 = 1
} adafuse_weight_dtype;
typedef struct {
  int32_t pdl;     // adafuse_pdl_mode
  int32_t gemv1;   // adafuse_gemv1_shape
  int32_t shrink;  // adafuse_shrink_kind
  // Nonzero: no kernel launched earlier on the stream may still access the workspace's memory (a
  // buffer kept for this call site, as the GPU decoder's and the TensorRT plugin's per-context
  // one-row buffer are; never scratch that a stream-ordered allocator or TensorRT hands out
  // again). The one-row shrink then launches as a programmatic dependent too and clears its flag
  // before the previous kernel has completed. 0: it launches in stream order (the GEMV still
  // overlaps it), so any 16-byte aligned memory of the right size is a valid workspace.
  int32_t exclusive_workspace;
  int32_t weight_dtype;       // adafuse_weight_dtype
  const float* weight_scale;  // [out] float32 (device) with ADAFUSE_WEIGHT_FP8_E4M3, else NULL
} adafuse_lora_options;
// options NULL: every field 0 (the library's choices; the shrink in stream order; W of dtype). A
// field outside its enum, exclusive_workspace not 0 or 1, or weight_scale not matching
// weight_dtype gives ADAFUSE_ERR_INVALID_ARGUMENT.
size_t adafuse_lora_linear_workspace_size(int rows, int in_features, int out_features,
                                          int num_experts, int rank, int top_k);
int adafuse_lora_linear(adafuse_dtype dtype, int rows, int in_features, int out_features,
                        const void* x, const void* W, const void* bias,
                        const void* A, const void* B, int num_experts, int rank,
                        const int32_t* expert_ids, const float* gates, int top_k,
                        float scale, void* y, void* workspace, size_t workspace_bytes,
                        const adafuse_lora_options* options, cudaStream_t stream);

// ---- Fused switch (the paper's SGMM) --------------------------------------
// One site = one adapted weight matrix. The site table lives in device memory.
typedef struct {
  void* W;              // [out, in] dtype, written
  const void* W_base;   // [out, in] pristine copy (base_dtype), or NULL (see adafuse_switch)
  const void* A;        // [E, rank, in]
  const void* B;        // [E, out, rank]
  int32_t out_features;
  int32_t in_features;
  int32_t rank;
  int32_t num_experts;
  float scale;
  // adafuse_weight_dtype of W_base: ADAFUSE_WEIGHT_AS_DTYPE (W_base has dtype; base_scale NULL) or
  // ADAFUSE_WEIGHT_FP8_E4M3: W_base is float8 e4m3 [out, in] with float32 per-row scales
  // base_scale[out] (device), dtype FLOAT16 or BFLOAT16 only, and W_base must not be NULL (the
  // merged weight is dtype; merging deltas into FP8 would round them away: an e4m3 ulp is 12.5%).
  int32_t base_dtype;
  const float* base_scale;
} adafuse_switch_site;

// One launch over all sites (all layers). Route arrays are device arrays of
// length top_k. For each site:
//   W_base != NULL:  W = W_base + scale * sum_j new_gates[j] B[new_ids[j]] A[new_ids[j]]
//                    (re-derived from the pristine copy: no drift; an FP8 W_base enters as
//                    W_base[o, i] * base_scale[o], exactly, and W gets dtype)
//   W_base == NULL:  W += scale * (sum_j new_gates[j] B A[new] - sum_j old_gates[j] B A[old])
//                    (in place; old_ids[j] < 0 means "nothing merged")
// Accumulated in float32, rounded to dtype once. If new and old routes are identical the kernel
// writes nothing (checked on the device, so the call is graph-capturable). After the call the
// caller copies new -> old (adafuse_switch does it on the device when update_old != 0).
// The site table is device memory, so adafuse_switch cannot refuse a bad site: it skips one whose
// base fields break the rules above (as one with bad sizes), and callers check every site on the
// host with adafuse_switch_check_site when they build the table.
int adafuse_switch(adafuse_dtype dtype, const adafuse_switch_site* sites, int num_sites,
                   int max_out_features, int max_in_features,
                   const int32_t* new_ids, const float* new_gates,
                   int32_t* old_ids, float* old_gates, int top_k, int update_old,
                   cudaStream_t stream);
// Host-side check of one site record (site: host memory; its pointers are not dereferenced) for
// adafuse_switch with dtype: ADAFUSE_OK, or ADAFUSE_ERR_INVALID_ARGUMENT for a bad dtype or base_dtype,
// an FP8 base with dtype FLOAT32, without W_base (in-place mode) or without base_scale, or a
// base_scale with a dtype base. Sizes are not checked (adafuse_switch skips sites beyond max_*).
// Needs no GPU.
int adafuse_switch_check_site(adafuse_dtype dtype, const adafuse_switch_site* site);

#ifdef ADAFUSE_DIAGNOSTICS
// Benchmark builds only (-DADAFUSE_DIAGNOSTICS; the shipped library has neither this function
// nor the kernels of the wrong-by-design variants): adafuse_switch with its kernel sequence
// chosen, for same-run A/B and for bounding the switch's costs.
typedef enum {
  ADAFUSE_SWITCH_VARIANT_DEFAULT = 0,       // adafuse_switch's: resident kernel at 2 blocks/SM,
                                            // then at 1 block/SM, chunked kernel where neither fits
  ADAFUSE_SWITCH_VARIANT_CHUNKED = 1,       // the chunked kernel alone
  ADAFUSE_SWITCH_VARIANT_RESIDENT_2PB = 2,  // resident kernel at 2 blocks/SM, then chunked
  ADAFUSE_SWITCH_VARIANT_NO_MMA = 3,        // WRONG by design: A and B staged, product skipped
  ADAFUSE_SWITCH_VARIANT_NO_DELTA = 4       // WRONG by design: W tiles only stream through the ring
} adafuse_switch_variant;
int adafuse_switch_diagnostic(int variant, adafuse_dtype dtype, const adafuse_switch_site* sites,
                              int num_sites, int max_out_features, int max_in_features,
                              const int32_t* new_ids, const float* new_gates, int32_t* old_ids,
                              float* old_gates, int top_k, int update_old, cudaStream_t stream);
#endif

// ---- Decode-step operations between the projections ---------------------------
// Each replaces a chain of small framework kernels with one launch (two for attention).
// Intermediates are rounded to the storage dtype where separate framework ops would round.

// h [rows, hidden] (updated in place when delta != NULL), delta [rows, hidden] or NULL,
// weight [hidden], out [rows, hidden]:
//   if delta: h = dtype(h + delta);  out = dtype(weight * dtype(h * rsqrt(mean(h^2) + eps)))
int adafuse_add_rms_norm(adafuse_dtype dtype, int rows, int hidden, void* h, const void* delta,
                         const void* weight, float eps, void* out, cudaStream_t stream);

// Rotary embedding of q and k plus the KV-cache write, for tokens n = b * seq + s:
// q [tokens, heads*D] (row stride ldq elements), k and v [tokens, kv_heads*D] (ldk, ldv),
// cos, sin [tokens, D] (dtype), positions [tokens] int64 in [0, max_seq) (others: nothing
// written), q_out [tokens, heads*D] contiguous, caches [batch', kv_heads, max_seq, D]:
//   q_out = q*cos + rotate_half(q)*sin;  k_cache[b, :, positions[n]] = rope(k);  v_cache[...] = v.
int adafuse_rope_kv_write(adafuse_dtype dtype, int batch, int seq, int num_heads, int num_kv_heads,
                          int head_dim, const void* q, long long ldq, const void* k, long long ldk,
                          const void* v, long long ldv, const void* cos, const void* sin,
                          const int64_t* positions, void* q_out, void* k_cache, void* v_cache,
                          int max_seq, cudaStream_t stream);

// out [rows, inter] = dtype(dtype(silu(gate)) * up); gate and up [rows, inter] with row stride ld.
int adafuse_silu_mul(adafuse_dtype dtype, int rows, int inter, const void* gate, const void* up,
                     long long ld, void* out, cudaStream_t stream);

// One query token per row b at position positions[b] (int64, device): causal attention over
// keys j in (positions[b] - window, positions[b]] (window <= 0: no lower bound) of the caches
// [batch', kv_heads, max_seq, D]; query head h reads KV head h / (heads / kv_heads).
// q [batch, heads*D], out [batch, heads*D]; scores are q.k * scale in float32. Split-K over
// key chunks (flash-decoding) plus a combine; workspace: adafuse_decode_attention_workspace_size.
// Needs heads % kv_heads == 0, heads / kv_heads <= ADAFUSE_ATTN_MAX_GROUP, D * element size a
// power-of-two multiple of 16 bytes up to 512 bytes, 16-byte aligned q and caches.
#define ADAFUSE_ATTN_MAX_GROUP 8
size_t adafuse_decode_attention_workspace_size(int batch, int num_heads, int head_dim, int max_seq);
int adafuse_decode_attention(adafuse_dtype dtype, int batch, int num_heads, int num_kv_heads,
                             int head_dim, int max_seq, const void* q, const void* k_cache,
                             const void* v_cache, const int64_t* positions, int window, float scale,
                             void* out, void* workspace, size_t workspace_bytes, cudaStream_t stream);


// ---- Model operations of the native backend (runtime/src/native_backend.cpp) ----------------
// Every family the project reads, prefill and decode, one or many sequences per call
// (in-flight batching: each sequence with its own cache slot and length). Tokens of a call are
// concatenated sequence by sequence; token n belongs to cache row slots[n] and sits at position
// positions[n] (int64, device). Rounding follows adafuse_export/families/features.py (the
// definition every backend meets): intermediates are rounded to the storage dtype where the
// PyTorch reference rounds. All only enqueue work on `stream` and are graph-capturable.

typedef enum { ADAFUSE_NORM_RMS = 0, ADAFUSE_NORM_RMS_ONE_PLUS = 1 } adafuse_norm_kind;
typedef enum { ADAFUSE_ACT_SILU = 0, ADAFUSE_ACT_GELU_TANH = 1 } adafuse_activation;

// out[n] = table[ids[n]] * dtype(scale) (rounded to dtype; scale 1: a copy); ids [tokens] int64
// (device) each in [0, vocab): an id outside leaves its row of out untouched (the runtime checks
// ids on the host first), table [vocab, hidden], out [tokens, hidden].
int adafuse_embed(adafuse_dtype dtype, int tokens, int hidden, long long vocab, const int64_t* ids,
                  const void* table, float scale, void* out, cudaStream_t stream);

// adafuse_add_rms_norm for both norm kinds and strided rows: h [rows, hidden] row stride ldh
// (updated in place when delta != NULL), delta row stride ld_delta, out row stride ldo:
//   if delta: h = dtype(h + delta)
//   RMS:          out = dtype(weight * dtype(h * rsqrt(mean(h^2) + eps)))      (Llama)
//   RMS_ONE_PLUS: out = dtype(h * rsqrt(mean(h^2) + eps) * (1 + float(weight))) (Gemma)
// (the norm in float32). out may equal h (delta must then be NULL).
int adafuse_norm(adafuse_dtype dtype, adafuse_norm_kind kind, int rows, int hidden, void* h,
                 long long ldh, const void* delta, long long ld_delta, const void* weight, float eps,
                 void* out, long long ldo, cudaStream_t stream);

// The per-head norm of q or k (Qwen 3, Gemma 3), in place: x [tokens, heads * head_dim] with row
// stride ld (elements), each head's head_dim values normed with weight [head_dim].
int adafuse_head_norm(adafuse_dtype dtype, adafuse_norm_kind kind, int tokens, int heads, int head_dim,
                      void* x, long long ld, const void* weight, float eps, cudaStream_t stream);

// out [rows, inter] = dtype(dtype(act(gate)) * up); gate and up [rows, inter] with row stride ld.
// SILU: x * sigmoid(x); GELU_TANH: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in float32.
int adafuse_act_mul(adafuse_dtype dtype, adafuse_activation act, int rows, int inter, const void* gate,
                    const void* up, long long ld, void* out, cudaStream_t stream);

// Rotary embedding of q and k on the first rotary_dim dims of each head (rotate_half pairs i and
// i + rotary_dim/2; the rest of the head is copied), plus the KV-cache write, for token n:
//   f = (use_long && use_long[n]) ? long_inv_freq : inv_freq   (float32 [rotary_dim / 2], device)
//   cos = dtype(cosf(float(positions[n]) * f[i]) * attention_factor), sin likewise (features.rope_cos_sin)
//   q_out[n] = q[n] * cos + rotate_half(q[n]) * sin   (each product rounded to dtype, then the sum)
//   k_cache[slots[n], :, positions[n]] = rope(k[n]);  v_cache[slots[n], :, positions[n]] = v[n]
// q [tokens, heads*D] row stride ldq, k, v [tokens, kv_heads*D] (ldk, ldv), q_out [tokens, heads*D]
// contiguous, caches [cache_rows, kv_heads, max_seq, D]. A token with positions[n] outside
// [0, max_seq) or slots[n] < 0 writes nothing. long_inv_freq and use_long may be NULL (one table).
int adafuse_rope_cache_write(adafuse_dtype dtype, int tokens, int num_heads, int num_kv_heads, int head_dim,
                             int rotary_dim, const void* q, long long ldq, const void* k, long long ldk,
                             const void* v, long long ldv, const float* inv_freq, const float* long_inv_freq,
                             const uint8_t* use_long, float attention_factor, const int32_t* slots,
                             const int64_t* positions, void* q_out, void* k_cache, void* v_cache, int max_seq,
                             cudaStream_t stream);

// Causal GQA attention of num_seqs sequences over the caches (after adafuse_rope_cache_write):
// sequence i has query tokens [seq_starts[i], seq_starts[i+1]) (int32 [num_seqs + 1], device;
// seq_starts[0] = 0) in cache row seq_slots[i]; query token n attends to keys j of that row with
// j <= positions[n] and, when window > 0, j > positions[n] - window. Scores s = q.k * scale in
// float32, then s = softcap * tanh(s / softcap) when softcap > 0; softmax in float32; query head h
// reads KV head h / (heads / kv_heads). q [tokens, heads*D], out [tokens, heads*D] contiguous.
// max_seq_tokens (host) bounds every sequence's query count: 1 runs the split-K decode kernel
// (one query per sequence, flash-decoding), more runs the tiled prefill kernel (a block per
// query tile and head, key tiles in shared memory, online softmax; bfloat16 and float16 with
// head_dim % 16 == 0 on tensor cores, the probabilities rounded to the dtype before P V as the
// reference model rounds them; float32 and head_dim 8 in float32 throughout). Same limits as
// adafuse_decode_attention on head_dim, groups and alignment; also num_seqs, num_heads <= 65535,
// and with max_seq_tokens == 1, tokens <= num_seqs (a sequence may have no query this call).
// Workspace: the decode kernel's split-K partials, adafuse_attention_workspace_size (it grows with
// tokens and max_seq only: size once for the largest); the prefill kernel takes none (NULL, 0).
// A query whose position is outside [0, max_seq) sees no key: its output is NaN (the runtime checks).
size_t adafuse_attention_workspace_size(int tokens, int num_seqs, int num_heads, int head_dim, int max_seq);
int adafuse_attention(adafuse_dtype dtype, int tokens, int num_seqs, int max_seq_tokens, int num_heads,
                      int num_kv_heads, int head_dim, int max_seq, const void* q, const void* k_cache,
                      const void* v_cache, const int32_t* seq_starts, const int32_t* seq_slots,
                      const int64_t* positions, int window, float scale, float softcap, void* out,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream);

// dst[i] = src[index[i]] for rows of `cols` elements (row strides ld_src, ld_dst): the last
// token of each sequence before the LM head. An index < 0 leaves its row of dst untouched.
int adafuse_gather_rows(adafuse_dtype dtype, int rows, int cols, const void* src, long long ld_src,
                        const int32_t* index, void* dst, long long ld_dst, cudaStream_t stream);

// Final logits: out [rows, vocab] float32 = float(in) (in [rows, vocab] dtype, row stride ld_in),
// then softcap * tanh(out / softcap) when softcap > 0.
int adafuse_logits_to_float(adafuse_dtype dtype, int rows, long long vocab, const void* in, long long ld_in,
                            float softcap, float* out, cudaStream_t stream);

// A softmax router (adafuse_export/reference/model.py route_topk), in float32: for each row,
// logits[e] = float(x[row]) . weight[e] (+ bias[e]) (weight [experts, in] float32, bias [experts]
// float32 or NULL), p = softmax(logits), the top_k largest p with ties to the lower expert id
// first, renormalized to sum 1 when normalize != 0; ids [rows, top_k] int32, gates [rows, top_k]
// float32. x [rows, in] dtype with row stride ldx; experts <= ADAFUSE_LORA_MAX_EXPERTS.
int adafuse_route_topk(adafuse_dtype dtype, int rows, int in_features, const void* x, long long ldx,
                       const float* weight, const float* bias, int experts, int top_k, int normalize,
                       int32_t* ids, float* gates, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif  // ADAFUSE_KERNELS_H
