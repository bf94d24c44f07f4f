// The native artifact (OUT.native/ from `adafuse-export convert --backend native`, adafuse_export/native_artifact.py):
// opened and checked with the engine's readers (manifest.cpp's file hashes, files.cpp, the strict
// safetensors reader), every tensor's name, dtype and shape derived from the manifest's model config and
// compared, and the family features its execution needs listed against what the native kernels cover.
// Nothing here executes the model: native_backend.h does, after require_covered().
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace adafuse {

inline constexpr const char* kNativeFormat = "adafuse-native";  // native_artifact.py FORMAT
inline constexpr int kNativeVersion = 1;                         // native_artifact.py VERSION
inline constexpr const char* kNativeSuffix = ".native";
inline constexpr const char* kNativeManifest = "manifest.json";
inline constexpr const char* kNativeWeights = "weights.safetensors";
inline constexpr const char* kNativeAdapters = "adapters.safetensors";

struct NativeModule {
  std::string name;                // the family's projection (q_proj, qkv_proj, ...)
  std::vector<std::string> roles;  // the roles it stacks, in row order
  int64_t rank = 0;                // 0: no routed adapter
  int64_t row_begin = 0, row_end = 0;  // its rows in the stage's stacked matrix
};

struct NativeStage {
  std::string name;     // qkv, o, gate_up, down
  bool bias = false;
  std::string adapter;  // "" (none), "grouped" (one lora_linear site), "per_module" (a site and router each)
  int64_t experts = 0, rank = 0;  // rank: the grouped site's (its members' ranks summed)
  int64_t in_features = 0, out_features = 0;
  std::vector<NativeModule> modules;
};

struct NativeRope {
  std::string kind;  // families/rope.py rope_type
  double theta = 0, attention_factor = 1;
  bool long_table = false;  // LongRoPE: a second frequency set past switch_at
  int64_t switch_at = 0;    // long_table: a row whose largest position + 1 exceeds this uses the long set
};

// A model feature the execution needs, and whether the native kernels cover it.
struct NativeFeature {
  std::string name;
  bool covered = false;
};

struct NativeArtifact {
  std::filesystem::path dir, manifest_path;
  nlohmann::json json;
  // model
  std::string family, dtype;  // dtype: float32, float16, bfloat16
  // model.weights "fp8_e4m3": every stage's matrix is float8 e4m3 with float32 per-output-channel scales
  // (<stage>.weight_scale), run by the kernels' ADAFUSE_WEIGHT_FP8_E4M3 (W8A16); "dtype": the model dtype.
  bool fp8_weights = false;
  int64_t vocab = 0, hidden = 0, intermediate = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int64_t max_positions = 0;
  bool tied_head = false;
  // features
  std::string norm, activation;  // rms / rms_one_plus; silu / gelu_tanh
  double norm_eps = 0, embed_scale = 1, query_scale = 0;
  bool norms[4] = {false, false, false, false};  // attn_in, attn_out, mlp_in, mlp_out
  bool qk_norm = false;
  std::optional<double> attn_softcap, final_softcap;
  int64_t rotary_dim = 0;
  NativeRope rope;
  std::optional<NativeRope> sliding_rope;
  std::optional<int64_t> sliding_window;
  std::vector<int64_t> sliding_layers;
  // routing
  std::string routing_kind, expert_kind, pregate_input;  // pregate_input: "" unless routing pregate
  std::string router_kind;  // layerwise only: "topk" or "dense" (LoRAMoE: every expert, softmax gates)
  bool normalize_topk = true;
  int64_t num_experts = 0, top_k = 0;
  std::optional<std::filesystem::path> routes_file;
  // layout: layers x the four stages
  std::vector<std::vector<NativeStage>> stages;
  int32_t max_batch = 0, max_seq = 0;  // the runtime's KV-cache defaults (convert's --max-batch / --max-seq)
  size_t tensors = 0;                  // tensors checked

  // Opens DIR and checks, in order: a directory with manifest.json; its format, version and kernel-library
  // ABI; every file it lists (SHA-256, as an engine's); the config; each safetensors file's header and
  // every tensor against the config (no tensor missing or extra); the routing table. One-line refusals.
  static NativeArtifact open(const std::filesystem::path& dir);

  // Every feature the execution needs, in a fixed order.
  std::vector<NativeFeature> features() const;
  // Refuses (ADAFUSE_ERR_UNSUPPORTED) naming every feature the native kernels do not cover yet.
  void require_covered() const;
  // One line: family, dtype, layers, routing, tensors, ABI.
  std::string summary() const;
};

// What the native backend runs (native_backend.h over plugins/kernels' model operations).
extern const char* const kNativeCovers;

// A path the runtime opens as a native artifact: a directory or a name ending in .native.
bool is_native_artifact_path(const std::filesystem::path& path);

}  // namespace adafuse
