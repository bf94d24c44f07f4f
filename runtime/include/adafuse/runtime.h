/* adafuse runtime: run engines made by `adafuse-export convert` from C, C++ or any language with a C FFI.
 *
 * The one public header. Every function returns an adafuse_status; on failure
 * adafuse_last_error() holds a one-line message (per thread) naming the file, tensor or option,
 * what was expected and what was found. Handles are opaque; free each with its *_free function.
 *
 * The engine contract is the manifest OUT.json beside OUT.engine (see adafuse_export/trt/manifest.py):
 * tensors, optimisation profiles (0 prefill, 1 decode), routing, plugin, SHA-256 of every file.
 * TensorRT (libnvinfer.so.10) is opened at run time; nothing here links against it.
 */
#ifndef ADAFUSE_RUNTIME_H
#define ADAFUSE_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define ADAFUSE_API __attribute__((visibility("default")))
#else
#define ADAFUSE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum adafuse_status {
  ADAFUSE_OK = 0,
  ADAFUSE_ERR_INVALID_ARGUMENT = 1, /* a bad option, id, shape or NULL pointer */
  ADAFUSE_ERR_FILE = 2,             /* manifest, engine, routing table: missing, malformed, or hash mismatch */
  ADAFUSE_ERR_TENSORRT = 3,         /* TensorRT absent, too old, or it refused the engine */
  ADAFUSE_ERR_PLUGIN = 4,           /* plugin library missing, wrong, or of another version */
  ADAFUSE_ERR_CUDA = 5,             /* no GPU, out of memory, a failed CUDA call */
  ADAFUSE_ERR_INTERNAL = 6,         /* a bug: please report it with the message */
  ADAFUSE_ERR_UNSUPPORTED = 7       /* valid input this build cannot run: a model feature the native backend does
                                       not cover */
} adafuse_status;

/* The message of the calling thread's last failure ("" when none). Valid until its next call. */
ADAFUSE_API const char* adafuse_last_error(void);
/* Version of this library, e.g. "0.1.0". */
ADAFUSE_API const char* adafuse_version(void);
/* Version of the AdafuseLoraLinear plugin this runtime accepts in a manifest ("1"). */
ADAFUSE_API const char* adafuse_plugin_version(void);

/* ---- manifest (no TensorRT needed) ---------------------------------------------------------- */
typedef struct adafuse_manifest adafuse_manifest;
/* Reads ENGINE's manifest (ENGINE with the suffix .json) and checks it like Python's verify_engine:
 * format and version, engine present and its SHA-256, plugin version, and (check_files != 0) every
 * listed file present with its SHA-256. */
ADAFUSE_API adafuse_status adafuse_manifest_open(const char* engine_path, int check_files, adafuse_manifest** out);
/* The manifest as JSON text (owned by the handle). */
ADAFUSE_API const char* adafuse_manifest_json(const adafuse_manifest* manifest);
ADAFUSE_API void adafuse_manifest_free(adafuse_manifest* manifest);

/* ---- routing table (the pre-gate exported by `export-routes` / `convert`) ----------------- */
typedef struct adafuse_routes adafuse_routes;
/* A safetensors file with expert_ids int32 [vocab, k] and gates float32 [vocab, k]. */
ADAFUSE_API adafuse_status adafuse_routes_open(const char* path, adafuse_routes** out);
ADAFUSE_API void adafuse_routes_shape(const adafuse_routes* routes, int64_t* vocab, int32_t* top_k);
/* Looks up n token ids: expert_ids and gates receive n * top_k values each. */
ADAFUSE_API adafuse_status adafuse_routes_lookup(const adafuse_routes* routes, const int64_t* ids, size_t n,
                                                 int32_t* expert_ids, float* gates);
ADAFUSE_API void adafuse_routes_free(adafuse_routes* routes);

/* ---- sampling ------------------------------------------------------------------------------ */
typedef struct adafuse_sampling {
  float temperature; /* 0: greedy (argmax); > 0: softmax(logits / temperature) */
  int32_t top_k;     /* 0: off; else keep the k most likely tokens */
  float top_p;       /* 1: off; else keep the smallest set of tokens whose probability reaches top_p */
  uint64_t seed;     /* same seed, same logits: same tokens */
} adafuse_sampling;
/* Greedy defaults (temperature 0, top_k 0, top_p 1, seed 0). */
ADAFUSE_API adafuse_sampling adafuse_sampling_default(void);

typedef struct adafuse_sampler adafuse_sampler;
ADAFUSE_API adafuse_status adafuse_sampler_create(const adafuse_sampling* options, adafuse_sampler** out);
/* Draws one token from logits [vocab] (float32) and advances the sampler's random stream. */
ADAFUSE_API adafuse_status adafuse_sampler_next(adafuse_sampler* sampler, const float* logits, int64_t vocab,
                                                int64_t* token);
ADAFUSE_API void adafuse_sampler_free(adafuse_sampler* sampler);

/* ---- engine -------------------------------------------------------------------------------- */
typedef struct adafuse_engine adafuse_engine;
typedef struct adafuse_open_options {
  const char* engine_path;       /* OUT.engine written by `adafuse-export convert` (required) */
  const char* tensorrt_library;  /* NULL: libnvinfer.so.N (N: the TensorRT major the runtime was built for, 10),
                                    libnvinfer.so, then pip's site-packages/tensorrt_libs; for a version-compatible
                                    engine (manifest engine.version_compatible) the lean runtime libnvinfer_lean.so.N,
                                    libnvinfer_lean.so, then tensorrt_lean_libs and tensorrt_libs; or a path. Its
                                    version must be the one that built the engine (manifest backend_version) */
  const char* plugin_library;    /* NULL: $ADAFUSE_PLUGIN_LIB, else the one installed beside the runtime */
  int32_t device;                /* CUDA device ordinal */
  int32_t cuda_graphs;           /* nonzero: replay decode steps from CUDA graphs where the engine allows */
  const char* strategy;          /* native artifacts: "fused" (NULL, the default: adafuse_lora_linear) or "switch"
                                    (adafuse_switch merges the token's experts into the weights; batch 1, pre-gated
                                    artifacts); TensorRT engines take NULL or "fused" only */
} adafuse_open_options;
ADAFUSE_API adafuse_open_options adafuse_open_options_default(void);

/* Checks the manifest, loads TensorRT and the plugin library, deserializes the engine, creates one
 * execution context per profile and allocates the KV cache (max_batch x max_seq, owned here).
 * engine_path a directory or a name ending in .native: a native artifact (`convert --backend native`),
 * checked in full (manifest, kernel ABI, SHA-256 of every file, every tensor's dtype and shape, the
 * features it needs: ADAFUSE_ERR_UNSUPPORTED names any not covered), then run by the native backend on
 * `device` with the project's kernels: all device memory (weights, KV cache, activations) allocated
 * here, an out-of-memory refused here with the bytes needed (runtime/README.md, 'The native backend'). */
ADAFUSE_API adafuse_status adafuse_engine_open(const adafuse_open_options* options, adafuse_engine** out);
/* The engine's limits: sequences per batch, tokens per sequence (prompt + generated), vocabulary. */
ADAFUSE_API void adafuse_engine_limits(const adafuse_engine* engine, int32_t* max_batch, int32_t* max_seq,
                                       int64_t* vocab);
ADAFUSE_API void adafuse_engine_free(adafuse_engine* engine);

/* Called once per generated token. Return nonzero to stop that sequence early. */
typedef int (*adafuse_token_callback)(void* user, int32_t sequence, int64_t token);

typedef struct adafuse_generate_options {
  adafuse_sampling sampling;  /* sequence i samples with seed sampling.seed + i */
  int32_t max_new_tokens;
  const int64_t* stop_ids;    /* generation of a sequence ends after it emits one of these */
  size_t num_stop_ids;
  adafuse_token_callback on_token; /* may be NULL */
  void* user;
} adafuse_generate_options;
ADAFUSE_API adafuse_generate_options adafuse_generate_options_default(void);

/* Generates for `batch` prompts of `prompt_len` tokens each (prompt_ids row-major [batch, prompt_len]):
 * one prefill, then one decode step for all unfinished sequences at a time.
 * out_tokens [batch, max_new_tokens] receives the tokens (-1 after a sequence ends) and
 * out_lengths [batch] the number generated per sequence. */
ADAFUSE_API adafuse_status adafuse_generate(adafuse_engine* engine, const int64_t* prompt_ids, int32_t batch,
                                            int32_t prompt_len, const adafuse_generate_options* options,
                                            int64_t* out_tokens, int32_t* out_lengths);

/* Generates for n prompts of any lengths (prompts[i] points at prompt_lens[i] ids), n may exceed
 * max_batch. On an engine with in-flight batching (the native backend and TensorRT engines) the
 * prompts take free cache slots in order and share every step: decode rows of the running ones plus
 * prefill chunks of the newcomers (runtime/README.md, "Batching"); a sequence that ends frees its slot for
 * the next prompt. A backend without a step runs equal-length batches only: prompts of one length,
 * n <= max_batch, or ADAFUSE_ERR_UNSUPPORTED. Sequence i samples with seed sampling.seed + i; on_token gets sequence i.
 * out_tokens [n, max_new_tokens] receives the tokens (-1 after a sequence ends), out_lengths [n] the
 * number generated. A failed step ends the call with its status and names the sequence. */
ADAFUSE_API adafuse_status adafuse_generate_many(adafuse_engine* engine, const int64_t* const* prompts,
                                                 const int32_t* prompt_lens, int32_t n,
                                                 const adafuse_generate_options* options, int64_t* out_tokens,
                                                 int32_t* out_lengths);

/* Step-level access (what `adafuse-export validate` compares with the PyTorch reference).
 * prefill: starts a new batch; logits [batch, len, vocab] (float32) for every prompt position.
 * expert_ids/gates [batch, len, top_k] receive the routes fed to the engine (may be NULL).
 * decode: ids [batch] continue the batch by one token; logits [batch, vocab]. */
ADAFUSE_API adafuse_status adafuse_prefill(adafuse_engine* engine, const int64_t* ids, int32_t batch, int32_t len,
                                           float* logits, int32_t* expert_ids, float* gates);
ADAFUSE_API adafuse_status adafuse_decode(adafuse_engine* engine, const int64_t* ids, int32_t batch, float* logits,
                                          int32_t* expert_ids, float* gates);
/* In-flight steps (engines whose adafuse_step_limits says in_flight: the native backend): sequences of
 * different lengths share a step, each in its own cache slot in [0, max_batch). A row takes `count` new
 * tokens at positions start .. start + count - 1 of its slot (start 0 begins a sequence; start at most the
 * tokens the slot holds). ids: the rows' tokens concatenated in row order. logits receives, row after row,
 * [count, vocab] float32 for a row with all_logits != 0, else [vocab] (its last position).
 * expert_ids/gates [total tokens, top_k] receive the routes (may be NULL). The slot lengths move only when
 * the step succeeds. */
typedef struct adafuse_step_row {
  int32_t slot;
  int32_t start;
  int32_t count;
  int32_t all_logits;
} adafuse_step_row;
ADAFUSE_API adafuse_status adafuse_step(adafuse_engine* engine, const int64_t* ids, const adafuse_step_row* rows,
                                        int32_t n_rows, float* logits, int32_t* expert_ids, float* gates);
/* in_flight: 1 when adafuse_step runs (0: equal-length batches only); max_step_tokens: the most tokens of one step. */
ADAFUSE_API void adafuse_step_limits(const adafuse_engine* engine, int32_t* in_flight, int32_t* max_step_tokens);
/* Tokens slot `slot` holds (0 when out of range or released). */
ADAFUSE_API int32_t adafuse_slot_length(const adafuse_engine* engine, int32_t slot);
/* GPU time in milliseconds of the engine's last prefill, decode or step (of its last chunk, for a prompt longer
 * than one step): from its first upload to its last download on the engine's stream (CUDA events), so the
 * call's wall time minus it is the host's share of the call. ADAFUSE_ERR_UNSUPPORTED where the backend does not measure it (TensorRT engines) or before the first
 * call that succeeded. */
ADAFUSE_API adafuse_status adafuse_last_step_gpu_time(const adafuse_engine* engine, double* milliseconds);
/* Tokens held in the KV cache of the current batch. */
ADAFUSE_API int32_t adafuse_past_length(const adafuse_engine* engine);
/* The cache's layer count, KV heads and head size. */
ADAFUSE_API void adafuse_kv_shape(const adafuse_engine* engine, int32_t* layers, int32_t* kv_heads, int32_t* head_dim);
/* Copies the cached keys (value == 0) or values (value != 0) of one layer as float32
 * [batch, kv_heads, past_length, head_dim]. */
ADAFUSE_API adafuse_status adafuse_read_kv(const adafuse_engine* engine, int32_t layer, int32_t value, float* out);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ADAFUSE_RUNTIME_H */
