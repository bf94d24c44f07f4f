#include "engine_layout.h"

#include <algorithm>

#include "decoder_contract.h"
#include "error.h"
#include "files.h"

namespace adafuse {

size_t dtype_bytes(const std::string& d) {
  if (d == "float" || d == "int32") return 4;
  if (d == "half" || d == "bf16") return 2;
  if (d == "int64") return 8;
  return 0;
}

using nlohmann::json;

namespace {
// A top-k axis as int32 (-1 and 0 are refused below; larger than int32 becomes -1, refused too).
int32_t narrow_axis(int64_t v) { return v > INT32_MAX ? -1 : static_cast<int32_t>(v); }

// [-1, 2, 16, 4], as the manifest writes a shape.
std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}
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
  namespace dc = decoder_contract;
  EngineLayout l;
  l.max_batch = m.max_batch;
  l.max_seq = m.max_seq;
  l.kv_in_place = m.kv_in_place;
  need(m.input(dc::kInputIds), dc::kInputIds, "input", "int64", 2);
  need(m.input(dc::kPastLengths), dc::kPastLengths, "input", "int64", 1);
  need(m.input(dc::kSeqLens), dc::kSeqLens, "input", "int64", 1);
  l.vocab = need(m.output(dc::kLogits), dc::kLogits, "output", "float", 3).shape[2];
  if (l.vocab < 1) fail(ADAFUSE_ERR_FILE, where + ": output 'logits' has no fixed vocabulary axis");
  const std::string k0_name = std::string(dc::kPastPrefix) + "0.key";
  const TensorDesc& k0 = need(m.input(k0_name), k0_name.c_str(), "input", nullptr, 4);
  l.kv_dtype = k0.dtype;
  if (dtype_bytes(l.kv_dtype) == 0 || l.kv_dtype == "int32" || l.kv_dtype == "int64")
    fail(ADAFUSE_ERR_FILE, where + ": input 'past_key_values.0.key' is " + l.kv_dtype + ", expected half, bf16 or float");
  if (k0.shape[1] < 1 || k0.shape[3] < 1 || k0.shape[1] > INT32_MAX || k0.shape[3] > INT32_MAX)
    fail(ADAFUSE_ERR_FILE, where + ": input 'past_key_values.0.key' needs fixed KV-head and head_dim axes of at most " +
                               std::to_string(INT32_MAX) + ", found " + std::to_string(k0.shape[1]) + " and " +
                               std::to_string(k0.shape[3]));
  l.kv_heads = static_cast<int32_t>(k0.shape[1]);
  l.head_dim = static_cast<int32_t>(k0.shape[3]);
  while (m.input(dc::kPastPrefix + std::to_string(l.layers) + ".key") != nullptr) ++l.layers;
  for (int32_t i = 0; i < l.layers; ++i)
    for (const char* kind : {"key", "value"}) {
      const std::string past = dc::kPastPrefix + std::to_string(i) + "." + kind;
      const std::string present = dc::kPresentPrefix + std::to_string(i) + "." + kind;
      for (const auto& [t, name, io] : {std::tuple{m.input(past), past, "input"}, std::tuple{m.output(present), present, "output"}}) {
        const TensorDesc& d = need(t, name.c_str(), io, l.kv_dtype.c_str(), 4);
        if (d.shape[1] != l.kv_heads || d.shape[3] != l.head_dim)
          fail(ADAFUSE_ERR_FILE, where + ": " + io + " '" + name + "' has KV heads/head_dim " + std::to_string(d.shape[1]) +
                                     "/" + std::to_string(d.shape[3]) + ", layer 0 has " + std::to_string(l.kv_heads) + "/" +
                                     std::to_string(l.head_dim));
        if (d.shape[2] != -1 && d.shape[2] != l.max_seq)  // the backend binds its whole cache: max_seq positions
          fail(ADAFUSE_ERR_FILE, where + ": " + io + " '" + name + "' holds " + std::to_string(d.shape[2]) +
                                     " positions, expected a dynamic axis or max_seq " + std::to_string(l.max_seq));
        // TensorRT updates a cache in place only when its sequence axis is static (IKVCacheUpdateLayer)
        if (l.kv_in_place && d.shape[2] != l.max_seq)
          fail(ADAFUSE_ERR_FILE, where + ": " + io + " '" + name + "' has a dynamic cache axis; an in-place cache "
                                     "(engine.kv_in_place) needs it static, max_seq " + std::to_string(l.max_seq) +
                                     " positions: convert the model again");
      }
      // present shares its past's memory: one shape (the dtype is layer 0's for both, checked above)
      if (l.kv_in_place && m.output(present)->shape != m.input(past)->shape)
        fail(ADAFUSE_ERR_FILE, where + ": output '" + present + "' has shape " + shape_text(m.output(present)->shape) +
                                   ", input '" + past + "' " + shape_text(m.input(past)->shape) +
                                   ": an in-place cache (engine.kv_in_place) needs them equal; convert the model again");
    }
  if (m.input(dc::kExpertIds) != nullptr) {
    l.routes_in = true;
    l.top_k = narrow_axis(need(m.input(dc::kExpertIds), dc::kExpertIds, "input", "int32", 3).shape[2]);
    need(m.input(dc::kGates), dc::kGates, "input", "float", 3);
    if (!m.routes_file)
      fail(ADAFUSE_ERR_FILE, m.engine_path.string() + ": the engine takes expert ids but its manifest names no routing table");
  } else if (m.output(dc::kExpertIds) != nullptr) {
    l.routes_out = true;
    l.top_k = narrow_axis(need(m.output(dc::kExpertIds), dc::kExpertIds, "output", "int32", 3).shape[2]);
    need(m.output(dc::kGates), dc::kGates, "output", "float", 3);
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
  // The profiles convert recorded (profiles[i].shapes[name] = [min, opt, max]), where present: the backend binds
  // the whole cache, so each profile's cache axis must reach max_seq and its batch axis 1..max_batch. (The
  // TensorRT backend checks the engine's own profiles again after deserializing it.)
  const json& profiles = lookup(m.json, {"profiles"});
  for (size_t p = 0; profiles.is_array() && p < profiles.size(); ++p) {
    const json& shapes = lookup(profiles[p], {"shapes"});
    if (!shapes.is_object() || !shapes.contains(k0_name)) continue;
    const json& range = shapes[k0_name];
    auto axis = [&](size_t which, size_t i) -> int64_t {
      const json& v = range.is_array() && range.size() == 3 && range[which].is_array() && range[which].size() == 4
                          ? range[which][i] : json();
      return v.is_number_integer() ? v.get<int64_t>() : -1;
    };
    const int64_t min_batch = axis(0, 0), max_batch = axis(2, 0), min_cache = axis(0, 2), max_cache = axis(2, 2);
    if (min_batch < 0 || max_batch < 0 || min_cache < 0 || max_cache < 0)
      fail(ADAFUSE_ERR_FILE, where + ": profile " + std::to_string(p) + " of '" + k0_name +
                                 "' must be [min, opt, max] shapes of rank 4, found " + range.dump());
    if (min_batch > 1 || max_batch < l.max_batch || min_cache > l.max_seq || max_cache < l.max_seq)
      fail(ADAFUSE_ERR_FILE, where + ": profile " + std::to_string(p) + " of '" + k0_name + "' takes batch " +
                                 std::to_string(min_batch) + ".." + std::to_string(max_batch) + " and cache length " +
                                 std::to_string(min_cache) + ".." + std::to_string(max_cache) + "; the runtime binds batch 1.." +
                                 std::to_string(l.max_batch) + " over the whole cache (" + std::to_string(l.max_seq) +
                                 " positions): convert the model again");
  }
  return l;
}

EngineStep plan_step(const EngineLayout& layout, const int64_t* ids, const StepRow* rows, int32_t n_rows) {
  EngineStep s;
  for (int32_t r = 0; r < n_rows; ++r) {
    s.batch = std::max(s.batch, rows[r].slot + 1);
    s.width = std::max(s.width, rows[r].count);
  }
  if (s.batch < 1 || s.batch > layout.max_batch || s.width < 1 || s.width > layout.max_seq)
    fail(ADAFUSE_ERR_INTERNAL, "engine step of " + std::to_string(s.batch) + " rows, " + std::to_string(s.width) +
                                   " tokens wide, outside the engine's " + std::to_string(layout.max_batch) + " x " +
                                   std::to_string(layout.max_seq));
  s.profile = s.width == 1 ? 1 : 0;
  const size_t batch = static_cast<size_t>(s.batch), width = static_cast<size_t>(s.width);
  s.ids.assign(batch * width, 0);
  s.past_lengths.assign(batch, 0);
  s.seq_lens.assign(batch, 0);
  const int64_t* next = ids;
  for (int32_t r = 0; r < n_rows; ++r) {
    const StepRow& row = rows[r];
    const size_t slot = static_cast<size_t>(row.slot);
    std::copy(next, next + row.count, s.ids.begin() + static_cast<std::ptrdiff_t>(slot * width));
    next += row.count;
    s.past_lengths[slot] = row.start;
    s.seq_lens[slot] = row.count;
    const int64_t first = static_cast<int64_t>(slot * width);
    s.tokens.push_back({first, row.count});
    s.logits.push_back(row.all_logits ? EngineStep::Span{first, row.count} : EngineStep::Span{first + row.count - 1, 1});
  }
  return s;
}

std::vector<TensorBinding> step_bindings(const EngineLayout& layout, int32_t batch, int32_t width) {
  namespace dc = decoder_contract;
  const int64_t b = batch, w = width;
  std::vector<TensorBinding> out = {{dc::kInputIds, {b, w}}, {dc::kPastLengths, {b}}, {dc::kSeqLens, {b}}};
  if (layout.routes_in) {
    out.push_back({dc::kExpertIds, {b, w, layout.top_k}});
    out.push_back({dc::kGates, {b, w, layout.top_k}});
  }
  const std::vector<int64_t> cache = {b, layout.kv_heads, layout.max_seq, layout.head_dim};
  for (bool input : {true, false})
    for (int32_t l = 0; l < layout.layers; ++l)
      for (bool value : {false, true})
        out.push_back({(input ? dc::kPastPrefix : dc::kPresentPrefix) + std::to_string(l) + (value ? ".value" : ".key"), cache,
                       input, l, value, !input && !layout.kv_in_place});
  if (layout.routes_out) {
    out.push_back({dc::kExpertIds, {b, w, layout.top_k}, false});
    out.push_back({dc::kGates, {b, w, layout.top_k}, false});
  }
  out.push_back({dc::kLogits, {b, w, layout.vocab}, false});
  return out;
}

}  // namespace adafuse
