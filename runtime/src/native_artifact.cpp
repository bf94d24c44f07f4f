#include "native_artifact.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "error.h"
#include "files.h"
#include "kernel_abi.h"
#include "manifest.h"
#include "routing.h"
#include "safetensors.h"

namespace adafuse {
namespace fs = std::filesystem;
using nlohmann::json;

const char* const kNativeCovers =
    "every family feature (both norm kinds, post norms, q/k norm, SiLU and GeGLU, embedding scale, partial and "
    "scaled RoPE, sliding windows, soft-capping) with a routing table, an in-decoder pre-gate, per-projection "
    "routers or FFN experts, up to 8 routes per token";

namespace {

constexpr const char* kStageNames[] = {"qkv", "o", "gate_up", "down"};  // families.base.STAGES
const std::vector<std::string> kStageRoles[] = {{"q", "k", "v"}, {"o"}, {"gate", "up"}, {"down"}};
constexpr const char* kNormSlots[] = {"attn_in", "attn_out", "mlp_in", "mlp_out"};  // native_artifact.py NORM_SLOTS
// plugins/kernels/include/adafuse_kernels.h limits (ADAFUSE_MAX_TOP_K, _LORA_MAX_EXPERTS, _LORA_MAX_RANK,
// ADAFUSE_ATTN_MAX_GROUP); tests/test_native_artifact.py keeps them equal to the header.
constexpr int64_t kMaxTopK = 8, kMaxExperts = 256, kMaxRank = 4096, kMaxAttnGroup = 8;

std::string dims(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// Typed reads beyond FieldReader's, with its wording.
struct Fields {
  const FieldReader& r;
  const json& j;

  bool boolean(std::initializer_list<const char*> keys, const std::string& field) const {
    const json& v = lookup(j, keys);
    if (!v.is_boolean()) r.bad(field, "true or false", v);
    return v.get<bool>();
  }
  // A finite number; positive when asked.
  double number(const json& v, const std::string& field, bool positive) const {
    if (!v.is_number() || !std::isfinite(v.get<double>()) || (positive && !(v.get<double>() > 0)))
      r.bad(field, positive ? "a positive number" : "a finite number", v);
    return v.get<double>();
  }
  double number(std::initializer_list<const char*> keys, const std::string& field, bool positive = true) const {
    return number(lookup(j, keys), field, positive);
  }
  std::optional<double> optional_number(std::initializer_list<const char*> keys, const std::string& field) const {
    const json& v = lookup(j, keys);
    if (v.is_null()) return std::nullopt;
    return number(v, field + " (or null)", true);
  }
  static int64_t count(const FieldReader& r, const json& v, const std::string& field, int64_t lo) {
    if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > INT32_MAX)
      r.bad(field, lo > 0 ? "a positive integer" : "a non-negative integer", v);
    return v.get<int64_t>();
  }
  std::string choice(std::initializer_list<const char*> keys, const std::string& field,
                     std::initializer_list<const char*> options) const {
    const std::string value = r.text(j, keys, field);
    std::string expected;
    for (const char* o : options) {
      if (value == o) return value;
      expected += (expected.empty() ? "'" : " or '") + std::string(o) + "'";
    }
    r.bad(field, expected, lookup(j, keys));
  }
};

NativeRope parse_rope(const FieldReader& r, const json& v, const std::string& field, int64_t rotary_dim) {
  if (!v.is_object()) r.bad(field, "an object", v);
  Fields f{r, v};
  NativeRope rope;
  rope.kind = r.text(v, {"rope_type"}, field + ".rope_type");
  rope.theta = f.number({"rope_theta"}, field + ".rope_theta");
  rope.attention_factor = f.number({"attention_factor"}, field + ".attention_factor");
  const json& switch_at = lookup(v, {"switch_at"});
  if (!switch_at.is_null()) rope.switch_at = Fields::count(r, switch_at, field + ".switch_at", 1);
  rope.long_table = !switch_at.is_null();
  if (Fields::count(r, lookup(v, {"rotary_dim"}), field + ".rotary_dim", 1) != rotary_dim)
    r.bad(field + ".rotary_dim", "features.rotary_dim (" + std::to_string(rotary_dim) + ")", lookup(v, {"rotary_dim"}));
  return rope;
}

void parse_config(NativeArtifact& a) {
  const FieldReader r(a.manifest_path);
  const json& j = a.json;
  const Fields f{r, j};
  a.family = printable(r.text(j, {"model", "family"}, "model.family"));  // shown in messages
  a.dtype = f.choice({"model", "dtype"}, "model.dtype", {"float32", "float16", "bfloat16"});
  a.fp8_weights = f.choice({"model", "weights"}, "model.weights", {"dtype", "fp8_e4m3"}) == "fp8_e4m3";
  if (a.fp8_weights && a.dtype == "float32")
    r.bad("model.weights", "'dtype' with model.dtype float32 (FP8 weights run with 16-bit activations)",
          lookup(j, {"model", "weights"}));
  a.vocab = r.positive(j, {"model", "vocab_size"}, "model.vocab_size");
  a.hidden = r.positive(j, {"model", "hidden_size"}, "model.hidden_size");
  a.intermediate = r.positive(j, {"model", "intermediate_size"}, "model.intermediate_size");
  a.layers = r.positive(j, {"model", "num_layers"}, "model.num_layers");
  a.heads = r.positive(j, {"model", "num_heads"}, "model.num_heads");
  a.kv_heads = r.positive(j, {"model", "num_kv_heads"}, "model.num_kv_heads");
  a.head_dim = r.positive(j, {"model", "head_dim"}, "model.head_dim");
  a.max_positions = r.positive(j, {"model", "max_position_embeddings"}, "model.max_position_embeddings");
  a.tied_head = f.boolean({"model", "tie_word_embeddings"}, "model.tie_word_embeddings");
  if (a.heads % a.kv_heads != 0)
    r.bad("model.num_heads", "a multiple of model.num_kv_heads (" + std::to_string(a.kv_heads) + ")", lookup(j, {"model", "num_heads"}));

  a.norm = f.choice({"features", "norm"}, "features.norm", {"rms", "rms_one_plus"});
  a.norm_eps = f.number({"features", "norm_eps"}, "features.norm_eps");
  for (int i = 0; i < 4; ++i)
    a.norms[i] = f.boolean({"features", "norms", kNormSlots[i]}, std::string("features.norms.") + kNormSlots[i]);
  if (!a.norms[0] || !a.norms[2])
    r.bad("features.norms", "an object in which attn_in and mlp_in are true (every family has them)", lookup(j, {"features", "norms"}));
  a.qk_norm = f.boolean({"features", "qk_norm"}, "features.qk_norm");
  a.activation = f.choice({"features", "activation"}, "features.activation", {"silu", "gelu_tanh"});
  a.attn_softcap = f.optional_number({"features", "attn_softcap"}, "features.attn_softcap");
  a.final_softcap = f.optional_number({"features", "final_softcap"}, "features.final_softcap");
  a.embed_scale = f.number({"features", "embed_scale"}, "features.embed_scale");
  a.query_scale = f.number({"features", "query_scale"}, "features.query_scale");
  a.rotary_dim = r.positive(j, {"features", "rotary_dim"}, "features.rotary_dim");
  if (a.rotary_dim > a.head_dim || a.rotary_dim % 2 != 0)
    r.bad("features.rotary_dim", "even and at most model.head_dim (" + std::to_string(a.head_dim) + ")",
          lookup(j, {"features", "rotary_dim"}));
  a.rope = parse_rope(r, lookup(j, {"features", "rope"}), "features.rope", a.rotary_dim);
  if (!lookup(j, {"features", "sliding_rope"}).is_null())
    a.sliding_rope = parse_rope(r, lookup(j, {"features", "sliding_rope"}), "features.sliding_rope", a.rotary_dim);
  const json& window = lookup(j, {"features", "sliding_window"});
  if (!window.is_null()) a.sliding_window = Fields::count(r, window, "features.sliding_window", 1);
  const json& sliding = lookup(j, {"features", "sliding_layers"});
  if (!sliding.is_array()) r.bad("features.sliding_layers", "a list of layer numbers", sliding);
  for (const json& l : sliding) {
    const int64_t layer = Fields::count(r, l, "features.sliding_layers", 0);
    if (layer >= a.layers) r.bad("features.sliding_layers", "layer numbers below model.num_layers", sliding);
    a.sliding_layers.push_back(layer);
  }
  if (!a.sliding_layers.empty() && !a.sliding_window)
    r.bad("features.sliding_window", "a positive integer (features.sliding_layers names sliding layers)", window);

  a.routing_kind = f.choice({"routing", "kind"}, "routing.kind", {"pregate", "layerwise", "none"});
  a.expert_kind = f.choice({"routing", "expert_kind"}, "routing.expert_kind", {"linear", "ffn"});
  a.num_experts = r.positive(j, {"routing", "num_experts"}, "routing.num_experts");
  a.top_k = r.positive(j, {"routing", "top_k"}, "routing.top_k");
  if (a.routing_kind == "pregate")
    a.pregate_input = f.choice({"routing", "pregate_input"}, "routing.pregate_input", {"attn_norm_0", "mlp_norm_0"});
  if (a.routing_kind == "layerwise")
    a.router_kind = f.choice({"routing", "router_kind"}, "routing.router_kind", {"topk", "dense"});
  a.normalize_topk = f.boolean({"routing", "normalize_topk"}, "routing.normalize_topk");
  const json& routes = lookup(j, {"routing", "routes_file"});
  if (!routes.is_null())
    a.routes_file = confine(a.dir, r.text(j, {"routing", "routes_file"}, "routing.routes_file"), a.manifest_path.string());
  if (a.routes_file.has_value() != (a.pregate_input == "attn_norm_0"))
    r.bad("routing.routes_file", a.routes_file ? "null (only a pre-gate reading attn_norm_0 is a table)"
                                               : "a file name (a pre-gate reading attn_norm_0 is a routing table)", routes);
  a.max_batch = r.positive(j, {"runtime", "max_batch"}, "runtime.max_batch");
  a.max_seq = r.positive(j, {"runtime", "max_seq"}, "runtime.max_seq");
  if (a.max_seq > a.max_positions)
    r.bad("runtime.max_seq", "at most model.max_position_embeddings (" + std::to_string(a.max_positions) + ")",
          lookup(j, {"runtime", "max_seq"}));

  // The layout: four stages per layer, their projections' roles stacked in the kernels' order.
  const std::map<std::string, int64_t> role_rows = {{"q", a.heads * a.head_dim}, {"k", a.kv_heads * a.head_dim},
                                                    {"v", a.kv_heads * a.head_dim}, {"o", a.hidden},
                                                    {"gate", a.intermediate}, {"up", a.intermediate}, {"down", a.hidden}};
  const int64_t stage_in[] = {a.hidden, a.heads * a.head_dim, a.hidden, a.intermediate};
  const json& layers = lookup(j, {"layers"});
  if (!layers.is_array() || static_cast<int64_t>(layers.size()) != a.layers)
    r.bad("layers", "a list of model.num_layers (" + std::to_string(a.layers) + ") layers", layers);
  for (int64_t l = 0; l < a.layers; ++l) {
    const std::string at = "layers[" + std::to_string(l) + "]";
    const json& list = lookup(layers[static_cast<size_t>(l)], {"stages"});
    if (!list.is_array() || list.size() != 4) r.bad(at + ".stages", "a list of the 4 stages qkv, o, gate_up, down", list);
    std::vector<NativeStage> row;
    for (size_t i = 0; i < 4; ++i) {
      const json& s = list[i];
      const std::string sat = at + ".stages[" + std::to_string(i) + "]";
      NativeStage st;
      st.name = r.text(s, {"stage"}, sat + ".stage");
      if (st.name != kStageNames[i]) r.bad(sat + ".stage", std::string("'") + kStageNames[i] + "'", lookup(s, {"stage"}));
      const Fields sf{r, s};
      st.bias = sf.boolean({"bias"}, sat + ".bias");
      st.in_features = stage_in[i];
      if (a.fp8_weights && st.in_features % 16 != 0)
        r.bad("model.weights", "'dtype': FP8 weights need every stage's input size to be a multiple of 16, " + sat + " has " +
                                   std::to_string(st.in_features), lookup(j, {"model", "weights"}));
      const json& modules = lookup(s, {"modules"});
      if (!modules.is_array() || modules.empty()) r.bad(sat + ".modules", "a non-empty list", modules);
      std::vector<std::string> roles;
      for (const json& m : modules) {
        NativeModule mod;
        mod.name = r.text(m, {"name"}, sat + ".modules.name");
        const json& mroles = lookup(m, {"roles"});
        if (!mroles.is_array() || mroles.empty()) r.bad(sat + ".modules." + mod.name + ".roles", "a non-empty list", mroles);
        mod.row_begin = st.out_features;
        for (const json& role : mroles) {
          if (!role.is_string() || !role_rows.count(role.get<std::string>()))
            r.bad(sat + ".modules." + mod.name + ".roles", "role names", mroles);
          mod.roles.push_back(role.get<std::string>());
          roles.push_back(role.get<std::string>());
          st.out_features += role_rows.at(role.get<std::string>());
        }
        mod.row_end = st.out_features;
        mod.rank = Fields::count(r, lookup(m, {"rank"}), sat + ".modules." + mod.name + ".rank", 0);
        st.modules.push_back(std::move(mod));
      }
      if (roles != kStageRoles[i])
        r.bad(sat + ".modules", "projections computing the stage's roles in order (" + std::string(kStageNames[i]) + ")", modules);
      const json& adapter = lookup(s, {"adapter"});
      int64_t routed_rank = 0;
      for (const NativeModule& m : st.modules) routed_rank += m.rank;
      if (!adapter.is_null()) {
        st.adapter = r.text(adapter, {"layout"}, sat + ".adapter.layout");
        if (st.adapter != "grouped" && st.adapter != "per_module")
          r.bad(sat + ".adapter.layout", "'grouped' or 'per_module'", lookup(adapter, {"layout"}));
        st.experts = Fields::count(r, lookup(adapter, {"experts"}), sat + ".adapter.experts", 1);
        if (st.adapter == "grouped") {
          st.rank = Fields::count(r, lookup(adapter, {"rank"}), sat + ".adapter.rank", 1);
          if (st.rank != routed_rank)
            r.bad(sat + ".adapter.rank", "its modules' ranks summed (" + std::to_string(routed_rank) + ")", lookup(adapter, {"rank"}));
        }
      }
      if ((routed_rank > 0) != !adapter.is_null())
        r.bad(sat + ".adapter", routed_rank > 0 ? "an object (its modules have ranks)" : "null (no module has a rank)", adapter);
      row.push_back(std::move(st));
    }
    a.stages.push_back(std::move(row));
  }
}

struct Expected {
  std::string dtype;
  std::vector<int64_t> shape;
  bool optional = false;
};

// file -> tensor -> what it must be, derived from the config alone (native_artifact.py _Tensors writes the same).
std::map<std::string, std::map<std::string, Expected>> expected_tensors(const NativeArtifact& a) {
  const std::string w = a.dtype == "float32" ? "F32" : a.dtype == "float16" ? "F16" : "BF16";
  std::map<std::string, std::map<std::string, Expected>> out;
  auto& base = out[kNativeWeights];
  auto& adapters = out[kNativeAdapters];
  base["embed_tokens"] = {w, {a.vocab, a.hidden}};
  base["final_norm"] = {w, {a.hidden}};
  if (!a.tied_head) base["lm_head"] = {w, {a.vocab, a.hidden}};
  const std::pair<const char*, const std::optional<NativeRope>> ropes[] = {{"full", a.rope}, {"sliding", a.sliding_rope}};
  for (const auto& [which, rope] : ropes) {
    if (!rope) continue;
    base[std::string("rope.") + which + ".inv_freq"] = {"F32", {a.rotary_dim / 2}};
    if (rope->long_table) base[std::string("rope.") + which + ".long_inv_freq"] = {"F32", {a.rotary_dim / 2}};
  }
  if (a.routing_kind == "pregate" && a.pregate_input == "mlp_norm_0") {
    adapters["pregate.weight"] = {"F32", {a.num_experts, a.hidden}};
    adapters["pregate.bias"] = {"F32", {a.num_experts}, true};
  }
  for (int64_t l = 0; l < a.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (int i = 0; i < 4; ++i)
      if (a.norms[i]) base[p + kNormSlots[i] + "_norm"] = {w, {a.hidden}};
    if (a.qk_norm) {
      base[p + "q_norm"] = {w, {a.head_dim}};
      base[p + "k_norm"] = {w, {a.head_dim}};
    }
    for (const NativeStage& st : a.stages[static_cast<size_t>(l)]) {
      const std::string sp = p + st.name + ".";
      base[sp + "weight"] = {a.fp8_weights ? "F8_E4M3" : w, {st.out_features, st.in_features}};
      if (a.fp8_weights) base[sp + "weight_scale"] = {"F32", {st.out_features}};
      if (st.bias) base[sp + "bias"] = {w, {st.out_features}};
      if (st.adapter == "grouped") {
        adapters[sp + "lora_A"] = {w, {st.experts, st.rank, st.in_features}};
        adapters[sp + "lora_B"] = {w, {st.experts, st.out_features, st.rank}};
      } else if (st.adapter == "per_module") {
        for (const NativeModule& m : st.modules) {
          if (m.rank == 0) continue;
          const std::string mp = p + m.name + ".";
          adapters[mp + "lora_A"] = {w, {st.experts, m.rank, st.in_features}};
          adapters[mp + "lora_B"] = {w, {st.experts, m.row_end - m.row_begin, m.rank}};
          adapters[mp + "router"] = {"F32", {st.experts, st.in_features}};
        }
      }
    }
    if (a.routing_kind == "layerwise" && a.expert_kind == "ffn") {
      const NativeStage& mlp = a.stages[static_cast<size_t>(l)][2];  // gate_up: the FFN experts' count
      adapters[p + "mlp.router"] = {"F32", {mlp.experts > 0 ? mlp.experts : a.num_experts, a.hidden}};
    }
  }
  if (adapters.empty()) out.erase(kNativeAdapters);
  return out;
}

void check_tensors(NativeArtifact& a) {
  const json& files = lookup(a.json, {"files"});
  for (const auto& [file, expected] : expected_tensors(a)) {
    // Only files whose SHA-256 was just checked are read.
    if (!files.is_object() || !files.contains(file))
      fail(ADAFUSE_ERR_FILE, a.manifest_path.string() + ": 'files' does not list " + file + ", which the artifact's layout needs "
                                 "(every file the runtime reads is listed with its SHA-256)");
    const fs::path path = a.dir / file;
    const SafetensorsFile st(path, SafetensorsFile::Contents::header_only);
    for (const auto& [name, want] : expected) {
      auto it = st.tensors().find(name);
      if (it == st.tensors().end()) {
        if (want.optional) continue;
        fail(ADAFUSE_ERR_FILE, path.string() + ": missing tensor '" + name + "', expected " + want.dtype + " " + dims(want.shape) +
                                   " (from " + a.manifest_path.filename().string() + ")");
      }
      if (it->second.dtype != want.dtype || it->second.shape != want.shape)
        fail(ADAFUSE_ERR_FILE, path.string() + ": tensor '" + name + "' is " + it->second.dtype + " " + dims(it->second.shape) +
                                   ", expected " + want.dtype + " " + dims(want.shape) + " (from " +
                                   a.manifest_path.filename().string() + ")");
      ++a.tensors;
    }
    for (const auto& [name, tensor] : st.tensors())
      if (!expected.count(name))
        fail(ADAFUSE_ERR_FILE, path.string() + ": unexpected tensor '" + name + "' (" + tensor.dtype + " " + dims(tensor.shape) +
                                   "): the layout " + a.manifest_path.filename().string() + " describes has no such tensor");
  }
  if (a.routes_file) {
    const std::string rel = lookup(a.json, {"routing", "routes_file"}).get<std::string>();
    if (!files.is_object() || !files.contains(rel))
      fail(ADAFUSE_ERR_FILE, a.manifest_path.string() + ": 'files' does not list the routing table " + rel +
                                 " (every file the runtime reads is listed with its SHA-256)");
    const RoutingTable table(*a.routes_file, a.num_experts);  // int32 ids in [0, experts), float32 gates
    if (table.vocab() != a.vocab || table.top_k() != a.top_k)
      fail(ADAFUSE_ERR_FILE, a.routes_file->string() + ": routing table [" + std::to_string(table.vocab()) + ", " +
                                 std::to_string(table.top_k()) + "], expected [vocab_size, top_k] = [" + std::to_string(a.vocab) +
                                 ", " + std::to_string(a.top_k) + "]");
    a.tensors += 2;
  }
}

std::string rope_name(const NativeRope& rope) {
  std::string out = rope.kind;
  if (rope.attention_factor != 1.0) out += ", attention factor";
  if (rope.long_table) out += ", two frequency sets";
  return out;
}

}  // namespace

bool is_native_artifact_path(const fs::path& path) {
  std::error_code ec;
  return path.extension() == kNativeSuffix || fs::is_directory(path, ec);
}

NativeArtifact NativeArtifact::open(const fs::path& dir) {
  NativeArtifact a;
  a.dir = dir;
  a.manifest_path = dir / kNativeManifest;
  const std::string where = dir.string(), mpath = a.manifest_path.string();
  std::error_code ec;
  const fs::file_status status = fs::status(dir, ec);
  if (!fs::exists(status)) fail(ADAFUSE_ERR_FILE, where + ": native artifact not found");
  if (!fs::is_directory(status))
    fail(ADAFUSE_ERR_FILE, where + ": expected a native artifact directory (adafuse-export convert --backend native "
                                   "CKPT OUT.native), found a file");
  if (!fs::exists(fs::symlink_status(a.manifest_path, ec)))
    fail(ADAFUSE_ERR_FILE, where + ": its manifest " + mpath + " is missing (adafuse-export convert --backend native "
                                   "writes it; the artifact cannot be checked or run without it: convert again)");
  a.json = read_json(a.manifest_path);  // regular file, at most 64 MiB, nested at most 32 deep
  const nlohmann::json& j = a.json;
  if (!j.is_object() || lookup(j, {"format"}) != kNativeFormat)
    fail(ADAFUSE_ERR_FILE, mpath + ": not an adafuse native artifact manifest (expected format '" + kNativeFormat + "')");
  if (lookup(j, {"version"}) != kNativeVersion)
    fail(ADAFUSE_ERR_FILE, mpath + ": manifest version " + python_repr(lookup(j, {"version"})) +
                               " is not supported (expected " + std::to_string(kNativeVersion) + ")");
  const nlohmann::json& abi = lookup(j, {"kernels", "abi_version"});
  if (abi != kernel_abi_version())
    fail(ADAFUSE_ERR_FILE, mpath + ": written for kernel library ABI " + python_repr(abi) + ", this runtime's kernels are ABI " +
                               std::to_string(kernel_abi_version()) +
                               " (plugins/kernels adafuse_abi_version); convert again with the adafuse-export of this runtime");
  verify_listed_files(j, dir, a.manifest_path);
  parse_config(a);
  check_tensors(a);
  return a;
}

std::vector<NativeFeature> NativeArtifact::features() const {
  std::vector<NativeFeature> out;
  out.push_back({norm == "rms" ? "RMSNorm" : "(1+w) RMSNorm", true});
  if (norms[1] || norms[3]) out.push_back({"norms of the attention and MLP outputs", true});
  if (qk_norm) out.push_back({"q/k norm", true});
  out.push_back({activation == "silu" ? "SiLU-gated MLP" : "GeGLU MLP (gelu tanh)", true});
  if (embed_scale != 1.0) out.push_back({"embedding scale", true});
  out.push_back({rotary_dim == head_dim ? "full RoPE"
                                        : "partial RoPE (" + std::to_string(rotary_dim) + " of " + std::to_string(head_dim) + " dims)",
                 true});
  for (const NativeRope* r : {&rope, sliding_rope ? &*sliding_rope : nullptr}) {
    if (r != nullptr && (r->kind != "default" || r->attention_factor != 1.0 || r->long_table))
      out.push_back({"scaled RoPE (" + rope_name(*r) + ")", true});  // the artifact holds its frequency tables
  }
  if (sliding_rope) out.push_back({"a second RoPE for sliding layers", true});
  // adafuse_attention: heads / kv_heads <= 8, head_dim x element size a power-of-two multiple of 16 up to 512 bytes
  const int64_t bytes = head_dim * (dtype == "float32" ? 4 : 2), vectors = bytes / 16;
  const bool attention = heads / kv_heads <= kMaxAttnGroup && bytes % 16 == 0 && vectors > 0 && vectors <= 32 &&
                         (vectors & (vectors - 1)) == 0;
  out.push_back({attention ? "GQA decode attention"
                           : "decode attention of head_dim " + std::to_string(head_dim) + " with " +
                                 std::to_string(heads / kv_heads) + " query heads per KV head",
                 attention});
  if (attn_softcap) out.push_back({"attention soft-capping", true});
  if (sliding_window) out.push_back({"sliding-window attention", true});
  if (final_softcap) out.push_back({"final logit soft-capping", true});
  // Stages whose adapter no route reaches: the reference has none for them either (it would fail).
  bool attention_adapted_l0 = false, attention_adapted = false;
  for (size_t l = 0; l < stages.size(); ++l)
    for (size_t s = 0; s < 2; ++s)
      if (!stages[l][s].adapter.empty()) (l == 0 ? attention_adapted_l0 : attention_adapted) = true;
  if (routing_kind == "pregate" && routes_file) out.push_back({"routing table", true});
  if (routing_kind == "pregate" && !routes_file) {
    out.push_back({"in-decoder pre-gate (pregate_input mlp_norm_0)", true});
    if (attention_adapted_l0) out.push_back({"a routed adapter on layer 0's attention, before the pre-gate has run", false});
  }
  if (routing_kind == "layerwise" && expert_kind == "ffn") {
    out.push_back({"FFN experts (MixLoRA)", true});
    if (attention_adapted || attention_adapted_l0) out.push_back({"a routed attention adapter beside FFN experts", false});
  }
  if (routing_kind == "layerwise" && expert_kind == "linear")
    out.push_back({"a router per projection (layerwise)", true});
  int64_t experts = 0, rank = 0;
  for (const auto& layer : stages)
    for (const NativeStage& st : layer) {
      experts = std::max(experts, st.experts);
      rank = std::max(rank, st.adapter == "grouped" ? st.rank : int64_t{0});
      for (const NativeModule& m : st.modules) rank = std::max(rank, m.rank);
    }
  if (experts > 0) {
    // A dense (LoRAMoE) router feeds every expert to each token: its routes per token are the experts.
    const bool dense = routing_kind == "layerwise" && router_kind == "dense";
    if (!dense && top_k > kMaxTopK) out.push_back({"top-" + std::to_string(top_k) + " routes (the kernels take 8)", false});
    if (dense && experts > kMaxTopK)
      out.push_back({"a dense router over " + std::to_string(experts) + " experts (the kernels take 8 routes per token)", false});
    if (experts > kMaxExperts) out.push_back({std::to_string(experts) + " experts per site (the kernels take 256)", false});
    if (rank > kMaxRank) out.push_back({"rank " + std::to_string(rank) + " per site (the kernels take 4096)", false});
  }
  return out;
}

void NativeArtifact::require_covered() const {
  std::string missing;
  for (const NativeFeature& f : features())
    if (!f.covered) missing += (missing.empty() ? "" : ", ") + f.name;
  if (!missing.empty())
    fail(ADAFUSE_ERR_UNSUPPORTED, dir.string() + ": " + family + " needs " + missing +
                                      ", which the native backend does not cover (it runs " + kNativeCovers + ")");
}

std::string NativeArtifact::summary() const {
  return dir.string() + ": " + family + " " + dtype + (fp8_weights ? " with FP8 e4m3 weights" : "") + ", " +
         std::to_string(layers) + " layers, routing " + routing_kind +
         (routing_kind == "none" ? "" : " (" + std::to_string(num_experts) + " experts, top-" + std::to_string(top_k) + ")") + ", " +
         std::to_string(tensors) + " tensors checked, kernel ABI " + std::to_string(kernel_abi_version());
}

}  // namespace adafuse
