// What the runtime reads from a manifest's tensors: the decoder's I/O contract, checked.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"
#include "manifest.h"

namespace adafuse {

struct EngineLayout {
  int32_t max_batch = 0, max_seq = 0;
  int64_t vocab = 0;
  int32_t layers = 0, kv_heads = 0, head_dim = 0;
  std::string kv_dtype;  // half, bf16 or float
  int32_t top_k = 0;     // routes per token, when the engine takes or returns expert_ids/gates
  bool routes_in = false;   // the engine takes expert_ids/gates (the routing table feeds them)
  bool routes_out = false;  // the engine computes its pre-gate inside and returns expert_ids/gates
  // engine.kv_in_place: the engine writes present.{l} into the memory of past_key_values.{l} (TensorRT's in-place
  // KV cache update), so the backend holds one cache; else present goes to a second cache and the two swap
  bool kv_in_place = false;
  int32_t cache_buffers() const { return kv_in_place ? 1 : 2; }
};

// Refuses a manifest whose tensors are not the decoder contract (decoder_contract.h: input_ids int64 [B, S],
// past_lengths/seq_lens int64 [B], optional expert_ids int32/gates float [B, S, k] as inputs or outputs,
// past_key_values.{l}.key/value and present.* of one dtype [B, KV, T, d] with T dynamic or max_seq, logits float
// [B, S, vocab]). An in-place engine (manifest kv_in_place) also needs each present of its past's very shape, T max_seq.
EngineLayout engine_layout(const Manifest& manifest);
size_t dtype_bytes(const std::string& manifest_dtype);

// One engine call for in-flight rows (decoder_contract.h). The cache holds one row per slot, max_seq positions
// long, and the engine's batch is cache rows 0 .. batch-1 with batch = 1 + the highest slot stepped; a slot
// below it that is not stepped rides along with seq_lens 0 (its cache is carried unchanged). Rows are padded
// to the widest row's new tokens (padding id 0).
struct EngineStep {
  int32_t batch = 0, width = 0;
  int profile = 0;  // 0: prefill (width > 1), 1: decode (one token per row)
  std::vector<int64_t> ids;                     // [batch, width]
  std::vector<int64_t> past_lengths, seq_lens;  // [batch]
  // Per step row, in order: the engine positions (index into [batch * width]) whose logits it receives, and
  // its new tokens' positions (routes). Logits are the last position's unless the row asks for all.
  struct Span {
    int64_t first = 0, count = 0;
  };
  std::vector<Span> logits, tokens;
};
// The plan of a step whose rows Backend::step checked (distinct slots, counts within max_seq).
EngineStep plan_step(const EngineLayout& layout, const int64_t* ids, const StepRow* rows, int32_t n_rows);

// A tensor the backend binds for an engine call, with the shape the contract gives it (the cache's length
// axis is always max_seq: the whole cache is bound). layer >= 0 for past_key_values / present.
struct TensorBinding {
  std::string name;
  std::vector<int64_t> shape;
  bool input = true;
  int32_t layer = -1;
  bool value = false;  // the cache's values (else keys)
  // present.{l} of a copy engine: bound in the other cache of the two (ping-pong); false for every input and for an
  // in-place engine's present, bound where its past is
  bool other_cache = false;
};
// Every tensor of one call of `batch` rows `width` tokens wide, inputs first.
std::vector<TensorBinding> step_bindings(const EngineLayout& layout, int32_t batch, int32_t width);

}  // namespace adafuse
