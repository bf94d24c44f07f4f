// What the runtime reads from a manifest's tensors: the decoder's I/O contract, checked.
#pragma once

#include <cstdint>
#include <string>

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
};

// Refuses a manifest whose tensors are not the decoder contract (input_ids/position_ids int64,
// optional expert_ids int32/gates float [B, S, k] as inputs or outputs, past_key_values.{l}.key/value and present.* of
// one dtype [B, KV, T, d], logits float [B, S, vocab]).
EngineLayout engine_layout(const Manifest& manifest);
size_t dtype_bytes(const std::string& manifest_dtype);

}  // namespace adafuse
