// The engine manifest (OUT.json beside OUT.engine) that `adafuse-export convert` writes, checked as
// adafuse_export/trt/manifest.py verify_engine checks it, with the same refusals and wording.
#pragma once

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "decoder_contract.h"

namespace adafuse {

inline constexpr const char* kManifestFormat = "adafuse-engine";
inline constexpr int kManifestVersion = decoder_contract::kVersion;  // the tensor contract the engine follows
// Must equal adafuse_export/onnx/plugin_ops.py PLUGIN_VERSION (a pytest checks it).
inline constexpr const char* kPluginVersion = "1";
// Must equal adafuse_export/onnx/plugin_ops.py OP_TYPES.
inline constexpr const char* kPluginOpTypes[] = {"AdafuseLoraLinear", "AdafuseSwitchLinear"};

struct TensorDesc {
  std::string name;
  std::string dtype;           // manifest spelling: int64, int32, float, half, bf16
  std::vector<int64_t> shape;  // -1 for a dynamic axis
};

struct PluginDesc {
  std::string library, name, version;
};

struct Manifest {
  std::filesystem::path engine_path, manifest_path;
  nlohmann::json json;
  std::string backend, backend_version, dtype;
  // engine.version_compatible (absent: false): built with `convert --version-compatible`, run on TensorRT's lean runtime
  bool version_compatible = false;
  // engine.kv_in_place (absent: false): the decoder updates its KV cache in place (TensorScatter, TensorRT >= 10.15):
  // present.{l} is bound to the memory of past_key_values.{l}
  bool kv_in_place = false;
  int32_t max_batch = 0, max_seq = 0;
  std::vector<TensorDesc> inputs, outputs;
  std::string routing_kind;
  int32_t top_k = 0;
  int32_t num_experts = 0;  // routing.num_experts (0: not stated); routing-table ids must lie below it
  std::optional<std::filesystem::path> routes_file;  // absolute (engine folder + relative name)
  std::optional<PluginDesc> plugin;

  const TensorDesc* input(const std::string& name) const;
  const TensorDesc* output(const std::string& name) const;
};

// Reads and checks ENGINE's manifest; check_files also hashes every file it lists.
Manifest verify_engine(const std::filesystem::path& engine, bool check_files = true);

// The manifest's 'files' (name -> SHA-256): every name confined to `folder`, present, listed once, then
// each file's SHA-256 compared (an engine's manifest and a native artifact's alike; trt/manifest.py
// verify_listed_files, same wording).
void verify_listed_files(const nlohmann::json& manifest, const std::filesystem::path& folder,
                         const std::filesystem::path& manifest_path);

// value at root[keys...], or null when any key on the way is missing (Python's .get(...).get(...)).
const nlohmann::json& lookup(const nlohmann::json& root, std::initializer_list<const char*> keys);

// Typed fields of a manifest, refused with "MANIFEST: field 'a.b' must be EXPECTED, found VALUE".
class FieldReader {
 public:
  explicit FieldReader(const std::filesystem::path& manifest) : where_(manifest.string()) {}
  [[noreturn]] void bad(const std::string& field, const std::string& expected, const nlohmann::json& found) const;
  std::string text(const nlohmann::json& root, std::initializer_list<const char*> keys, const std::string& field) const;
  int32_t positive(const nlohmann::json& root, std::initializer_list<const char*> keys, const std::string& field) const;
  std::vector<TensorDesc> tensors(const nlohmann::json& root, const char* kind) const;

 private:
  std::string where_;
};

// Python's repr() of a JSON scalar, so messages read as the Python ones do ('1', 2, None).
std::string python_repr(const nlohmann::json& value);

}  // namespace adafuse
