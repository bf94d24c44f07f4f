// The native backend's device memory, planned on the host before anything is allocated: every buffer
// the backend uses for the life of the engine (weights, the KV cache, activations for the largest step,
// routes, workspaces, per-step inputs), sized from the artifact and the limits alone, laid out in one
// block. Opening allocates the block once, so an out-of-memory is an error at open naming the bytes, and
// no request ever allocates. Pure host code (the kernels' workspace-size queries need no GPU): tested
// on the CPU (runtime/tests/test_native_plan.cpp, tests/test_native_artifact.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "native_artifact.h"

namespace adafuse {

inline constexpr int32_t kNativeDefaultStepTokens = 512;  // tokens of one step (prefill is chunked to it)
inline constexpr size_t kNativeAlignment = 256;           // every buffer's offset in the block
inline constexpr int32_t kNativeFewRows = 16;  // adafuse_lora_linear's few-rows kernels: at most this many rows
inline constexpr size_t kNativeCublasLtWorkspace = size_t{32} << 20;  // NVIDIA's recommendation for Hopper

struct NativeLimits {
  int32_t max_batch = 0, max_seq = 0;  // from the artifact (convert's --max-batch / --max-seq)
  int32_t max_step_tokens = 0;         // 0: kNativeDefaultStepTokens (at least max_batch, at most max_batch * max_seq)
  bool switch_strategy = false;        // a live model-dtype copy of every adapted stage's weight beside the pristine
                                       // one (16-bit or FP8)
  bool cublaslt = false;               // GEMMs of more than kNativeFewRows rows through cuBLASLt (16-bit dtypes)
};

// Sizes every buffer derives from (element counts and rows).
struct NativeDims {
  int64_t elt = 0;             // bytes per element of the model dtype
  int64_t tokens = 0;          // T: most tokens of one step
  int64_t mlp_rows = 0;        // T x top_k with FFN experts (each token runs its top-k FFNs), else T
  int64_t logit_rows = 0;      // rows of logits computed per LM-head pass (steps with more loop)
  int64_t qkv_out = 0, gate_up_out = 0;
  int64_t top_k = 0;           // routes per token of the pre-gate or FFN router (0: none)
  int64_t site_top_k = 0;      // routes per token of a per-projection router (0: none)
};

struct NativeBuffer {
  std::string name, group;  // group: weights, kv cache, activations, routes, workspaces, inputs
  size_t bytes = 0, offset = 0;
};

struct NativePlan {
  NativeLimits limits;
  NativeDims dims;
  std::vector<NativeBuffer> buffers;
  std::map<std::string, size_t> index;  // name -> position in buffers
  size_t total = 0;                     // bytes of the block

  const NativeBuffer& at(const std::string& name) const;
  bool has(const std::string& name) const { return index.count(name) != 0; }
  size_t group_bytes(const std::string& group) const;  // the buffers' own bytes, without alignment padding
  std::string describe() const;                         // one line per group, then the total
};

// Layout of the per-step inputs, packed in one host block and one device block (one copy per step).
struct NativeInputLayout {
  size_t ids = 0, positions = 0, slots = 0, use_long_full = 0, use_long_sliding = 0, seq_starts = 0, seq_slots = 0,
         gather = 0, bytes = 0;
};
NativeInputLayout native_input_layout(int64_t tokens, int64_t max_batch);

NativeDims native_dims(const NativeArtifact& a, const NativeLimits& limits);

// tensors: every (name, bytes) of the artifact's safetensors files, uploaded as they are ("w:" + name).
NativePlan plan_native(const NativeArtifact& a, const std::vector<std::pair<std::string, size_t>>& tensors,
                       NativeLimits limits);

// The (name, bytes) of every tensor of the artifact's weights and adapters files (their headers only).
std::vector<std::pair<std::string, size_t>> native_tensor_sizes(const NativeArtifact& a);

// Call sites of adafuse_lora_linear, in the order the step runs them: every stage, or each module of a
// per-module stage, and the LM head. Each has its own small workspace for the few-rows kernels.
struct NativeSite {
  int64_t layer = -1, stage = -1, module = -1;  // module -1: the whole stage; layer -1: the LM head
  int64_t in = 0, out = 0, experts = 0, rank = 0, top_k = 0, rows = 0;  // experts 0: no adapter
  std::string name;
};
std::vector<NativeSite> native_sites(const NativeArtifact& a, const NativeDims& d);

// Whether a site's adapter runs through cuBLASLt above kNativeFewRows rows when the plan has cuBLASLt: a
// 16-bit artifact's adapted site that may see that many rows, W not FP8 (cuBLASLt's FP8 GEMMs need FP8
// activations too, so FP8 weights keep the kernel library's GEMMs). Such a site has a B_cat copy of its
// lora_B ("lt.b_cat." + name); the shrink's t and the routed z are shared ("lt.t", "lt.z").
bool native_cublaslt_adapter(const NativeArtifact& a, const NativeSite& s);

}  // namespace adafuse
