#include "engine_layout.h"

#include "error.h"
#include "files.h"

namespace adafuse {

size_t dtype_bytes(const std::string& d) {
  if (d == "float" || d == "int32") return 4;
  if (d == "half" || d == "bf16") return 2;
  if (d == "int64") return 8;
  return 0;
}

namespace {
// A top-k axis as int32 (-1 and 0 are refused below; larger than int32 becomes -1, refused too).
int32_t narrow_axis(int64_t v) { return v > INT32_MAX ? -1 : static_cast<int32_t>(v); }
}  // namespace

EngineLayout engine_layout(const Manifest& m) {
  const std::string where = m.manifest_path.string();
  auto need = [&](const TensorDesc* t, const char* name, const char* kind, const char* dtype, size_t rank) -> const TensorDesc& {
    if (t == nullptr) fail(ADAFUSE_ERR_FILE, where + ": the engine has no " + kind + " '" + name + "'");
    if ((dtype != nullptr && t->dtype != dtype) || t->shape.size() != rank)
      fail(ADAFUSE_ERR_FILE, where + ": " + kind + " '" + name + "' is " + t->dtype + " of rank " +
                                 std::to_string(t->shape.size()) + ", expected " + (dtype ? dtype : "half/bf16/float") +
                                 " of rank " + std::to_string(rank));
    return *t;
  };
  EngineLayout l;
  l.max_batch = m.max_batch;
  l.max_seq = m.max_seq;
  need(m.input("input_ids"), "input_ids", "input", "int64", 2);
  need(m.input("position_ids"), "position_ids", "input", "int64", 2);
  l.vocab = need(m.output("logits"), "logits", "output", "float", 3).shape[2];
  if (l.vocab < 1) fail(ADAFUSE_ERR_FILE, where + ": output 'logits' has no fixed vocabulary axis");
  const TensorDesc& k0 = need(m.input("past_key_values.0.key"), "past_key_values.0.key", "input", nullptr, 4);
  l.kv_dtype = k0.dtype;
  if (dtype_bytes(l.kv_dtype) == 0 || l.kv_dtype == "int32" || l.kv_dtype == "int64")
    fail(ADAFUSE_ERR_FILE, where + ": input 'past_key_values.0.key' is " + l.kv_dtype + ", expected half, bf16 or float");
  if (k0.shape[1] < 1 || k0.shape[3] < 1 || k0.shape[1] > INT32_MAX || k0.shape[3] > INT32_MAX)
    fail(ADAFUSE_ERR_FILE, where + ": input 'past_key_values.0.key' needs fixed KV-head and head_dim axes of at most " +
                               std::to_string(INT32_MAX) + ", found " + std::to_string(k0.shape[1]) + " and " +
                               std::to_string(k0.shape[3]));
  l.kv_heads = static_cast<int32_t>(k0.shape[1]);
  l.head_dim = static_cast<int32_t>(k0.shape[3]);
  while (m.input("past_key_values." + std::to_string(l.layers) + ".key") != nullptr) ++l.layers;
  for (int32_t i = 0; i < l.layers; ++i)
    for (const char* kind : {"key", "value"}) {
      const std::string past = "past_key_values." + std::to_string(i) + "." + kind;
      const std::string present = "present." + std::to_string(i) + "." + kind;
      for (const auto& [t, name, io] : {std::tuple{m.input(past), past, "input"}, std::tuple{m.output(present), present, "output"}}) {
        const TensorDesc& d = need(t, name.c_str(), io, l.kv_dtype.c_str(), 4);
        if (d.shape[1] != l.kv_heads || d.shape[3] != l.head_dim)
          fail(ADAFUSE_ERR_FILE, where + ": " + io + " '" + name + "' has KV heads/head_dim " + std::to_string(d.shape[1]) +
                                     "/" + std::to_string(d.shape[3]) + ", layer 0 has " + std::to_string(l.kv_heads) + "/" +
                                     std::to_string(l.head_dim));
      }
    }
  if (m.input("expert_ids") != nullptr) {
    l.routes_in = true;
    l.top_k = narrow_axis(need(m.input("expert_ids"), "expert_ids", "input", "int32", 3).shape[2]);
    need(m.input("gates"), "gates", "input", "float", 3);
    if (!m.routes_file)
      fail(ADAFUSE_ERR_FILE, m.engine_path.string() + ": the engine takes expert ids but its manifest names no routing table");
  } else if (m.output("expert_ids") != nullptr) {
    l.routes_out = true;
    l.top_k = narrow_axis(need(m.output("expert_ids"), "expert_ids", "output", "int32", 3).shape[2]);
    need(m.output("gates"), "gates", "output", "float", 3);
  }
  if ((l.routes_in || l.routes_out) && l.top_k < 1)
    fail(ADAFUSE_ERR_FILE, where + ": 'expert_ids' needs a fixed top-k axis, found " + std::to_string(l.top_k));
  // Every buffer the backend sizes from these numbers, in checked 64-bit arithmetic.
  const std::string what = where + ": the engine's buffers (max_batch x max_seq x vocab, KV cache)";
  const uint64_t rows = checked_mul(static_cast<uint64_t>(l.max_batch), static_cast<uint64_t>(l.max_seq), what);
  checked_mul(checked_mul(rows, static_cast<uint64_t>(l.vocab), what), 4, what);
  checked_mul(checked_mul(checked_mul(checked_mul(rows, static_cast<uint64_t>(l.kv_heads), what),
                                      static_cast<uint64_t>(l.head_dim), what), dtype_bytes(l.kv_dtype), what),
              2ull * static_cast<uint64_t>(l.layers), what);
  return l;
}

}  // namespace adafuse
