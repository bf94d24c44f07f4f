#include "native_plan.h"

#include <algorithm>

#include "error.h"
#include "kernels_api.h"
#include "safetensors.h"

namespace adafuse {

namespace {

size_t align_up(size_t n) { return (n + kNativeAlignment - 1) / kNativeAlignment * kNativeAlignment; }
size_t z(int64_t n) { return static_cast<size_t>(n); }

bool ffn_experts(const NativeArtifact& a) { return a.routing_kind == "layerwise" && a.expert_kind == "ffn"; }

// Bytes of adafuse_lora_linear's workspace at a site and row count; a dense site (no adapter) is sized
// with one expert of rank 1, as the library asks of A == B == NULL calls.
size_t lora_workspace(const NativeSite& s, int64_t rows) {
  const bool dense = s.experts == 0;
  const size_t bytes = kernels::adafuse_lora_linear_workspace_size(
      static_cast<int>(rows), static_cast<int>(s.in), static_cast<int>(s.out), dense ? 1 : static_cast<int>(s.experts),
      dense ? 1 : static_cast<int>(s.rank), dense ? 1 : static_cast<int>(s.top_k));
  if (bytes == 0)
    fail(ADAFUSE_ERR_UNSUPPORTED, "adafuse_lora_linear takes no " + std::to_string(rows) + " rows at site " + s.name + " (in " +
                                      std::to_string(s.in) + ", out " + std::to_string(s.out) + ", " + std::to_string(s.experts) +
                                      " experts, rank " + std::to_string(s.rank) + ", top-" + std::to_string(s.top_k) +
                                      "): outside the kernel library's limits");
  return bytes;
}

}  // namespace

const NativeBuffer& NativePlan::at(const std::string& name) const {
  auto it = index.find(name);
  if (it == index.end()) fail(ADAFUSE_ERR_INTERNAL, "native plan: no buffer '" + name + "'");
  return buffers[it->second];
}

size_t NativePlan::group_bytes(const std::string& group) const {
  size_t sum = 0;
  for (const NativeBuffer& b : buffers)
    if (b.group == group) sum += b.bytes;
  return sum;
}

std::string NativePlan::describe() const {
  std::string out;
  for (const char* g : {"weights", "kv cache", "activations", "routes", "workspaces", "inputs"}) {
    size_t n = 0;
    for (const NativeBuffer& b : buffers) n += b.group == g ? 1 : 0;
    out += std::string("plan: ") + g + " " + std::to_string(group_bytes(g)) + " bytes in " + std::to_string(n) + " buffers\n";
  }
  return out + "plan: total " + std::to_string(total) + " bytes (" + std::to_string(limits.max_step_tokens) +
         " tokens per step, " + std::to_string(limits.max_batch) + " slots of " + std::to_string(limits.max_seq) + " positions)";
}

NativeInputLayout native_input_layout(int64_t tokens, int64_t max_batch) {
  NativeInputLayout l;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at = (at + bytes + 15) / 16 * 16;  // every array 16-byte aligned
    return here;
  };
  l.ids = take(z(tokens) * 8);
  l.positions = take(z(tokens) * 8);
  l.slots = take(z(tokens) * 4);
  l.use_long_full = take(z(tokens));
  l.use_long_sliding = take(z(tokens));
  l.seq_starts = take((z(max_batch) + 1) * 4);
  l.seq_slots = take(z(max_batch) * 4);
  l.gather = take(z(tokens) * 4);
  l.bytes = at;
  return l;
}

NativeDims native_dims(const NativeArtifact& a, const NativeLimits& limits) {
  NativeDims d;
  d.elt = a.dtype == "float32" ? 4 : 2;
  const int64_t most = int64_t{limits.max_batch} * limits.max_seq;
  d.tokens = limits.max_step_tokens > 0 ? limits.max_step_tokens : std::max<int64_t>(kNativeDefaultStepTokens, limits.max_batch);
  d.tokens = std::min(d.tokens, most);
  if (d.tokens < limits.max_batch)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "max_step_tokens " + std::to_string(d.tokens) + ": a decode step of every slot needs at least " +
                                           "max_batch (" + std::to_string(limits.max_batch) + ") tokens");
  if (a.routing_kind == "pregate" || ffn_experts(a)) d.top_k = a.top_k;
  if (a.routing_kind == "layerwise" && a.expert_kind == "linear") {
    int64_t experts = 0;
    for (const auto& layer : a.stages)
      for (const NativeStage& st : layer) experts = std::max(experts, st.experts);
    d.site_top_k = a.router_kind == "dense" ? experts : a.top_k;
  }
  d.mlp_rows = ffn_experts(a) ? d.tokens * a.top_k : d.tokens;
  if (d.mlp_rows > ADAFUSE_LORA_MAX_ROWS)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::to_string(d.tokens) + " tokens per step with top-" + std::to_string(a.top_k) +
                                           " FFN experts make " + std::to_string(d.mlp_rows) + " rows, over the kernels' " +
                                           std::to_string(ADAFUSE_LORA_MAX_ROWS) + " per call");
  d.logit_rows = std::min<int64_t>(d.tokens, std::max<int64_t>(limits.max_batch, 64));
  d.qkv_out = (a.heads + 2 * a.kv_heads) * a.head_dim;
  d.gate_up_out = 2 * a.intermediate;
  return d;
}

std::vector<NativeSite> native_sites(const NativeArtifact& a, const NativeDims& d) {
  static const char* const stage_names[] = {"qkv", "o", "gate_up", "down"};
  std::vector<NativeSite> out;
  const bool ffn = ffn_experts(a);
  for (size_t l = 0; l < a.stages.size(); ++l)
    for (size_t s = 0; s < 4; ++s) {
      const NativeStage& st = a.stages[l][s];
      const int64_t rows = ffn && s >= 2 ? d.mlp_rows : d.tokens;
      const std::string prefix = "layers." + std::to_string(l) + ".";
      if (st.adapter == "per_module") {
        for (size_t m = 0; m < st.modules.size(); ++m) {
          const NativeModule& mod = st.modules[m];
          const int64_t k = a.router_kind == "dense" ? st.experts : a.top_k;
          out.push_back({int64_t(l), int64_t(s), int64_t(m), st.in_features, mod.row_end - mod.row_begin,
                         mod.rank > 0 ? st.experts : 0, mod.rank, mod.rank > 0 ? k : 0, rows, prefix + mod.name});
        }
      } else {
        const bool adapted = st.adapter == "grouped";
        out.push_back({int64_t(l), int64_t(s), -1, st.in_features, st.out_features, adapted ? st.experts : 0,
                       adapted ? st.rank : 0, adapted ? (ffn ? 1 : a.top_k) : 0, rows, prefix + stage_names[s]});
      }
    }
  out.push_back({-1, -1, -1, a.hidden, a.vocab, 0, 0, 0, d.logit_rows, "lm_head"});
  return out;
}

bool native_cublaslt_adapter(const NativeArtifact& a, const NativeSite& s) {
  return s.experts > 0 && s.rows > kNativeFewRows && (a.dtype == "float16" || a.dtype == "bfloat16") && !a.fp8_weights;
}

std::vector<std::pair<std::string, size_t>> native_tensor_sizes(const NativeArtifact& a) {
  std::vector<std::pair<std::string, size_t>> out;
  for (const char* file : {kNativeWeights, kNativeAdapters}) {
    const std::filesystem::path path = a.dir / file;
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) continue;  // no adapters file without routed adapters (checked at open)
    const SafetensorsFile st(path, SafetensorsFile::Contents::header_only);
    for (const auto& [name, t] : st.tensors())
      out.emplace_back(name, t.bytes());
  }
  return out;
}

NativePlan plan_native(const NativeArtifact& a, const std::vector<std::pair<std::string, size_t>>& tensors,
                       NativeLimits limits) {
  NativePlan p;
  p.dims = native_dims(a, limits);
  limits.max_step_tokens = static_cast<int32_t>(p.dims.tokens);
  p.limits = limits;
  const NativeDims& d = p.dims;
  auto add = [&](const std::string& name, const std::string& group, size_t bytes) {
    p.index[name] = p.buffers.size();
    p.buffers.push_back({name, group, bytes, p.total});
    p.total += align_up(std::max<size_t>(bytes, 1));
  };
  for (const auto& [name, bytes] : tensors) add("w:" + name, "weights", bytes);
  const bool lt = limits.cublaslt && d.elt == 2;
  const std::vector<NativeSite> sites = native_sites(a, d);
  if (lt)
    for (const NativeSite& s : sites)
      if (native_cublaslt_adapter(a, s)) add("lt.b_cat." + s.name, "weights", z(s.out * s.experts * s.rank * d.elt));
  size_t switch_sites = 0;
  if (limits.switch_strategy)  // the live weights the switch merges into; the uploaded ones stay pristine
    for (size_t l = 0; l < a.stages.size(); ++l)
      for (const NativeStage& st : a.stages[l])
        if (st.adapter == "grouped") {
          add("switch:layers." + std::to_string(l) + "." + st.name + ".weight", "weights", z(st.out_features * st.in_features * d.elt));
          ++switch_sites;
        }
  const size_t slot_bytes = z(int64_t{limits.max_batch} * a.kv_heads * limits.max_seq * a.head_dim * d.elt);
  for (int64_t l = 0; l < a.layers; ++l)
    for (const char* which : {"key", "value"}) add("kv." + std::to_string(l) + "." + which, "kv cache", slot_bytes);

  const int64_t T = d.tokens, M = d.mlp_rows, L = d.logit_rows, e = d.elt, qdim = a.heads * a.head_dim;
  add("h", "activations", z(T * a.hidden * e));
  add("x", "activations", z(T * a.hidden * e));
  add("qkv", "activations", z(T * d.qkv_out * e));
  add("q_rot", "activations", z(T * qdim * e));
  add("attn", "activations", z(T * qdim * e));
  add("o", "activations", z(T * a.hidden * e));
  add("gate_up", "activations", z(M * d.gate_up_out * e));
  add("act", "activations", z(M * a.intermediate * e));
  add("down", "activations", z(M * a.hidden * e));
  if (ffn_experts(a)) {
    add("x_rep", "activations", z(M * a.hidden * e));  // each token's input once per expert it runs
    add("mix", "activations", z(T * a.hidden * e));    // the gated sum of its experts' outputs
  }
  add("last", "activations", z(L * a.hidden * e));
  add("logits", "activations", z(L * a.vocab * e));
  add("logits_f32", "activations", z(L * a.vocab * 4));
  if (lt) {  // a cuBLASLt adapter site's t = x A_all^T (float32) and routed z (the model dtype), [rows, E * rank]
    int64_t widest = 0;
    for (const NativeSite& s : sites)
      if (native_cublaslt_adapter(a, s)) widest = std::max(widest, s.rows * s.experts * s.rank);
    if (widest > 0) {
      add("lt.t", "activations", z(widest * 4));
      add("lt.z", "activations", z(widest * e));
    }
  }

  if (a.routes_file) {
    add("routes.table_ids", "routes", z(a.vocab * a.top_k * 4));
    add("routes.table_gates", "routes", z(a.vocab * a.top_k * 4));
  }
  if (d.top_k > 0) {
    add("routes.ids", "routes", z(T * d.top_k * 4));
    add("routes.gates", "routes", z(T * d.top_k * 4));
  }
  if (d.site_top_k > 0) {
    add("routes.site_ids", "routes", z(T * d.site_top_k * 4));
    add("routes.site_gates", "routes", z(T * d.site_top_k * 4));
  }
  if (ffn_experts(a)) {
    add("routes.ones", "routes", z(M * 4));    // gate 1 for the one expert of each (token, route) row
    add("routes.expand", "routes", z(M * 4));  // row n * top_k + j reads token n
  }
  if (switch_sites > 0) {
    add("switch.sites", "routes", switch_sites * sizeof(kernels::adafuse_switch_site));
    add("switch.old_ids", "routes", z(a.top_k * 4));
    add("switch.old_gates", "routes", z(a.top_k * 4));
  }

  size_t shared = 0;
  for (const NativeSite& s : sites) {
    shared = std::max(shared, lora_workspace(s, s.rows));
    // the few-rows kernels' own workspace per call site (exclusive: see adafuse_lora_options)
    add("ws.site." + s.name, "workspaces", lora_workspace(s, std::min<int64_t>(s.rows, 16)));
  }
  add("ws.shared", "workspaces", shared);
  if (lt) add("ws.cublaslt", "workspaces", kNativeCublasLtWorkspace);  // one stream: every cuBLASLt call shares it
  size_t attention = 0;
  for (int64_t tokens : {int64_t{limits.max_batch}, T})
    for (int64_t seqs : {int64_t{1}, int64_t{limits.max_batch}})
      if (seqs <= tokens)
        attention = std::max(attention, kernels::adafuse_attention_workspace_size(static_cast<int>(tokens), static_cast<int>(seqs),
                                                                                  static_cast<int>(a.heads), static_cast<int>(a.head_dim),
                                                                                  limits.max_seq));
  add("ws.attention", "workspaces", attention);
  add("inputs", "inputs", native_input_layout(T, limits.max_batch).bytes);
  return p;
}

}  // namespace adafuse
