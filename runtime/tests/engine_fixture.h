// A convert-shaped output folder written by the tests: OUT.engine (arbitrary bytes: nothing here
// deserializes it), OUT.onnx/ files, and OUT.json with their SHA-256 and the decoder's tensors as
// `adafuse-export convert` records them for a 2-layer model (vocab 8, 2 KV heads, head_dim 4, top-2).
#pragma once

#include "files.h"
#include "test_util.h"

namespace adafuse::testing {

class EngineFixture {
 public:
  EngineFixture() {
    write_file(dir_ / "out.engine", "serialized engine bytes");
    write_file(dir_ / "out.onnx/decoder.onnx", "decoder graph");
    std::vector<int32_t> ids(16);
    std::vector<float> gates(16);
    for (int i = 0; i < 16; ++i) ids[static_cast<size_t>(i)] = i % 3, gates[static_cast<size_t>(i)] = 0.1f * static_cast<float>(i);
    write_file(dir_ / "out.onnx/routes.safetensors",
               safetensors_bytes({{"expert_ids", "I32", {8, 2}, bytes_of(ids)}, {"gates", "F32", {8, 2}, bytes_of(gates)}}));
    using nlohmann::json;
    json inputs = json::array({{{"name", "input_ids"}, {"dtype", "int64"}, {"shape", {-1, -1}}},
                               {{"name", "past_lengths"}, {"dtype", "int64"}, {"shape", {-1}}},
                               {{"name", "seq_lens"}, {"dtype", "int64"}, {"shape", {-1}}},
                               {{"name", "expert_ids"}, {"dtype", "int32"}, {"shape", {-1, -1, 2}}},
                               {{"name", "gates"}, {"dtype", "float"}, {"shape", {-1, -1, 2}}}});
    json outputs = json::array();
    for (int l = 0; l < 2; ++l)
      for (const char* kind : {"key", "value"}) {
        inputs.push_back({{"name", "past_key_values." + std::to_string(l) + "." + kind}, {"dtype", "half"}, {"shape", {-1, 2, -1, 4}}});
        outputs.push_back({{"name", "present." + std::to_string(l) + "." + kind}, {"dtype", "half"}, {"shape", {-1, 2, -1, 4}}});
      }
    outputs.push_back({{"name", "logits"}, {"dtype", "float"}, {"shape", {-1, -1, 8}}});
    manifest = {
        {"format", "adafuse-engine"}, {"version", 2}, {"adafuse_export_version", "0.1.0"},
        {"engine", {{"file", "out.engine"}, {"sha256", sha256_file(engine())}, {"backend", "tensorrt"},
                    {"backend_version", "10.14.1"}, {"flavour", "plugin"}, {"dtype", "float16"}, {"max_batch", 2}, {"max_seq", 16}}},
        {"tensors", {{"inputs", inputs}, {"outputs", outputs}}},
        {"profiles", json::array({{{"index", 0}, {"name", "prefill"}}, {{"index", 1}, {"name", "decode"}}})},
        {"routing", {{"kind", "pregate"}, {"top_k", 2}, {"num_experts", 3}, {"routes_file", "out.onnx/routes.safetensors"},
                     {"pregate_graph", nullptr}}},
        {"plugin", {{"library", "libadafuse_trt_plugins.so"}, {"name", "AdafuseLoraLinear"}, {"version", "1"}}},
        {"files", {{"out.onnx/decoder.onnx", sha256_file(dir_ / "out.onnx/decoder.onnx")},
                   {"out.onnx/routes.safetensors", sha256_file(dir_ / "out.onnx/routes.safetensors")}}},
    };
    save();
  }
  void save() const { write_file(dir_ / "out.json", manifest.dump(2)); }
  fs::path engine() const { return dir_ / "out.engine"; }
  fs::path manifest_path() const { return dir_ / "out.json"; }
  fs::path file(const std::string& rel) const { return dir_ / rel; }

  nlohmann::json manifest;

 private:
  TempDir dir_;
};

}  // namespace adafuse::testing
