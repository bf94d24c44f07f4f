// Fuzz harness for the runtime's readers of untrusted bytes: the safetensors reader, the routing
// table, the engine manifest (+ decoder contract) and the HTTP request body. A finding is anything
// other than a clean adafuse::Error: a crash, a sanitizer report (built with ASan + UBSan), a hang
// (ctest's timeout) or another exception type.
//
// Two ways to run it:
// - with clang's libFuzzer: build with -fsanitize=fuzzer,address,undefined -DADAFUSE_LIBFUZZER and
//   FUZZ_TARGET in the environment (safetensors | routes | manifest | request);
// - without it (what ctest does here, gcc only): `adafuse_fuzz_readers TARGET [--seconds N] [--seed S]`
//   generates valid seed inputs, then mutates them (bit flips, interesting bytes and numbers, cuts,
//   splices, repeats) for N seconds with a fixed random seed. Before dying a sanitizer calls
//   back here to write the input to ./fuzz-crash-TARGET.bin and print its path.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine_layout.h"
#include "error.h"
#include "files.h"
#include "manifest.h"
#include "completions.h"
#include "request.h"
#include "routing.h"
#include "safetensors.h"

extern "C" void __sanitizer_set_death_callback(void (*callback)(void));

// The one C API symbol the request reader needs (SequenceOptions' defaults), without linking the
// whole C API (TensorRT backend, CUDA) into the sanitizer build: the same values as c_api.cpp's.
extern "C" adafuse_sampling adafuse_sampling_default(void) { return adafuse_sampling{0.0f, 0, 1.0f, 0}; }

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string target_name;
fs::path work;
const std::string* current = nullptr;

void write(const fs::path& p, const std::string& bytes) { std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes; }

std::string safetensors(const json& header, const std::string& data) {
  const std::string h = header.dump();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
  return out + h + data;
}

// The engine folder the manifest target reads: out.engine, out.onnx/{decoder.onnx, routes.safetensors}.
void prepare_engine_folder() {
  fs::create_directories(work / "out.onnx");
  write(work / "out.engine", "engine bytes");
  write(work / "out.onnx/decoder.onnx", "decoder");
  std::string ids, gates;
  for (int i = 0; i < 16; ++i) {
    const int32_t e = i % 3;
    const float g = 0.5f;
    ids.append(reinterpret_cast<const char*>(&e), 4);
    gates.append(reinterpret_cast<const char*>(&g), 4);
  }
  write(work / "out.onnx/routes.safetensors",
        safetensors({{"expert_ids", {{"dtype", "I32"}, {"shape", {8, 2}}, {"data_offsets", {0, 64}}}},
                     {"gates", {{"dtype", "F32"}, {"shape", {8, 2}}, {"data_offsets", {64, 128}}}},
                     {"__metadata__", {{"dtype", "float32"}}}},
                    ids + gates));
}

json manifest_seed() {
  json inputs = json::array({{{"name", "input_ids"}, {"dtype", "int64"}, {"shape", {-1, -1}}},
                             {{"name", "past_lengths"}, {"dtype", "int64"}, {"shape", {-1}}},
                             {{"name", "seq_lens"}, {"dtype", "int64"}, {"shape", {-1}}},
                             {{"name", "expert_ids"}, {"dtype", "int32"}, {"shape", {-1, -1, 2}}},
                             {{"name", "gates"}, {"dtype", "float"}, {"shape", {-1, -1, 2}}}});
  json outputs = json::array({{{"name", "logits"}, {"dtype", "float"}, {"shape", {-1, -1, 8}}}});
  for (int l = 0; l < 2; ++l)
    for (const char* kind : {"key", "value"}) {
      inputs.push_back({{"name", "past_key_values." + std::to_string(l) + "." + kind}, {"dtype", "half"}, {"shape", {-1, 2, -1, 4}}});
      outputs.push_back({{"name", "present." + std::to_string(l) + "." + kind}, {"dtype", "half"}, {"shape", {-1, 2, -1, 4}}});
    }
  return {{"format", "adafuse-engine"},
          {"version", 2},
          {"engine", {{"sha256", adafuse::sha256_file(work / "out.engine")}, {"backend", "tensorrt"}, {"backend_version", "10.14.1"},
                      {"dtype", "float16"}, {"max_batch", 2}, {"max_seq", 16}}},
          {"tensors", {{"inputs", inputs}, {"outputs", outputs}}},
          {"profiles", json::array({0, 1})},
          {"routing", {{"kind", "pregate"}, {"top_k", 2}, {"num_experts", 3}, {"routes_file", "out.onnx/routes.safetensors"}}},
          {"plugin", {{"library", "libadafuse_trt_plugins.so"}, {"name", "AdafuseLoraLinear"}, {"version", "1"}}},
          {"files", {{"out.onnx/decoder.onnx", adafuse::sha256_file(work / "out.onnx/decoder.onnx")},
                     {"out.onnx/routes.safetensors", adafuse::sha256_file(work / "out.onnx/routes.safetensors")}}}};
}

std::vector<std::string> seeds() {
  std::vector<std::string> out;
  if (target_name == "safetensors" || target_name == "routes") {
    std::string data(128, '\0');
    out.push_back(safetensors({{"expert_ids", {{"dtype", "I32"}, {"shape", {8, 2}}, {"data_offsets", {0, 64}}}},
                               {"gates", {{"dtype", "F32"}, {"shape", {8, 2}}, {"data_offsets", {64, 128}}}}},
                              data));
    out.push_back(safetensors({{"a", {{"dtype", "BF16"}, {"shape", {2, 3, 1}}, {"data_offsets", {0, 12}}}},
                               {"b", {{"dtype", "U8"}, {"shape", json::array()}, {"data_offsets", {12, 13}}}},
                               {"__metadata__", {{"k", "v"}}}},
                              std::string(13, '\1')));
    out.push_back(safetensors(json::object(), ""));
  } else if (target_name == "manifest") {
    out.push_back(manifest_seed().dump(1));
    json m = manifest_seed();
    m["plugin"] = nullptr;
    m["routing"] = {{"kind", "pregate"}, {"top_k", 2}};
    out.push_back(m.dump());
  } else {
    out.push_back(R"({"prompt_ids": [1, 2, 3], "max_new_tokens": 16, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3, "stop_ids": [2], "stream": true})");
    out.push_back(R"({"prompt_ids": [0]})");
    // /v1/completions bodies, read by the same target
    out.push_back(R"({"model": "m", "prompt": [[1, 2, 3]], "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 1, "stop_token_ids": [2], "stream": true, "stream_options": {"include_usage": true}, "n": 1, "logit_bias": {}, "stop": null, "user": "u"})");
    out.push_back(R"({"prompt": "text", "stop": ["x"], "echo": false})");
  }
  return out;
}

// One input through the target's reader; clean refusals (adafuse::Error) are expected.
void run_one(const std::string& input) {
  current = &input;
  try {
    if (target_name == "request") {  // both request readers: /v1/generate and /v1/completions
      try {
        bool stream = false;
        adafuse::parse_request(input, stream);
      } catch (const adafuse::Error& e) {
        if (std::strchr(e.what(), '\n') != nullptr) throw;
      }
      try {
        adafuse::parse_completion_request(input, "m");
      } catch (const adafuse::ModelNotFound& e) {
        if (std::strchr(e.what(), '\n') != nullptr) throw adafuse::Error(ADAFUSE_ERR_INVALID_ARGUMENT, e.what());
      }
    } else if (target_name == "manifest") {
      write(work / "out.json", input);
      const adafuse::Manifest m = adafuse::verify_engine(work / "out.engine", true);
      const adafuse::EngineLayout l = adafuse::engine_layout(m);
      if (m.routes_file) adafuse::RoutingTable t(*m.routes_file, m.num_experts);
      (void)l;
    } else {
      write(work / "in.safetensors", input);
      if (target_name == "safetensors") {
        adafuse::SafetensorsFile f(work / "in.safetensors");
        for (const auto& [name, t] : f.tensors()) (void)t.numel();
      } else {
        adafuse::RoutingTable t(work / "in.safetensors", 3);
        std::vector<int32_t> ids(static_cast<size_t>(t.top_k()));
        std::vector<float> gates(static_cast<size_t>(t.top_k()));
        for (int64_t id : {int64_t(0), t.vocab() - 1, t.vocab(), int64_t(-1)}) {
          try {
            t.lookup(&id, 1, ids.data(), gates.data());
          } catch (const adafuse::Error&) {
          }
        }
      }
    }
  } catch (const adafuse::Error& e) {
    if (std::strchr(e.what(), '\n') != nullptr) {
      std::fprintf(stderr, "finding: a refusal of more than one line: %s\n", e.what());
      std::abort();
    }
  }
  current = nullptr;
}

void on_death() {
  if (current == nullptr) return;
  const std::string path = "fuzz-crash-" + target_name + ".bin";
  write(path, *current);
  std::fprintf(stderr, "fuzz: the input that failed is in %s/%s\n", fs::current_path().c_str(), path.c_str());
}

const char* const kInteresting[] = {"0", "-1", "1", "255", "65535", "2147483647", "2147483648", "4294967296",
                                    "9223372036854775807", "9223372036854775808", "18446744073709551615",
                                    "18446744073709551616", "1099511627776", "16777216", "1e309", "-0", "0.5",
                                    "null", "true", "[]", "{}", "\"\"", "\"../x\"", "\"/dev/zero\"", "[[[[[[[["};

std::string mutate(std::string s, std::mt19937_64& rng, const std::vector<std::string>& corpus) {
  auto pick = [&](size_t n) { return n == 0 ? size_t(0) : static_cast<size_t>(rng() % n); };
  const int rounds = 1 + static_cast<int>(pick(4));
  for (int r = 0; r < rounds; ++r) {
    switch (pick(9)) {
      case 0:  // bit flip
        if (!s.empty()) s[pick(s.size())] ^= static_cast<char>(1 << pick(8));
        break;
      case 1:  // interesting byte
        if (!s.empty()) s[pick(s.size())] = "\0\xff\x7f\x80[]{}\",:-"[pick(12)];
        break;
      case 2: {  // replace a run of digits (a JSON number) with an interesting value
        std::vector<size_t> starts;
        for (size_t i = 0; i < s.size(); ++i)
          if (std::isdigit(static_cast<unsigned char>(s[i])) && (i == 0 || !std::isdigit(static_cast<unsigned char>(s[i - 1]))))
            starts.push_back(i);
        if (starts.empty()) break;
        const size_t at = starts[pick(starts.size())];
        size_t end = at;
        while (end < s.size() && std::isdigit(static_cast<unsigned char>(s[end]))) ++end;
        s.replace(at, end - at, kInteresting[pick(sizeof(kInteresting) / sizeof(*kInteresting))]);
        break;
      }
      case 3:  // cut
        if (!s.empty()) s.resize(pick(s.size()));
        break;
      case 4: {  // delete a range
        if (s.empty()) break;
        const size_t at = pick(s.size());
        s.erase(at, pick(s.size() - at + 1));
        break;
      }
      case 5: {  // repeat a range (deep nesting, long arrays)
        if (s.empty()) break;
        const size_t at = pick(s.size()), n = 1 + pick(std::min<size_t>(16, s.size() - at));
        const std::string part = s.substr(at, n);
        std::string rep;
        for (size_t i = 0, times = 1 + pick(64); i < times; ++i) rep += part;
        s.insert(at, rep);
        break;
      }
      case 6: {  // splice from another corpus entry
        const std::string& other = corpus[pick(corpus.size())];
        if (other.empty()) break;
        const size_t from = pick(other.size());
        s.insert(pick(s.size() + 1), other.substr(from, pick(other.size() - from + 1)));
        break;
      }
      case 7:  // an 8-byte little-endian length at the front (safetensors header length)
        if (s.size() >= 8) {
          const uint64_t v = pick(3) == 0 ? rng() : pick(s.size() + 16);
          for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
        }
        break;
      default:  // insert an interesting token
        s.insert(pick(s.size() + 1), kInteresting[pick(sizeof(kInteresting) / sizeof(*kInteresting))]);
    }
  }
  if (s.size() > (1u << 20)) s.resize(1u << 20);
  return s;
}

void setup(const std::string& target) {
  target_name = target;
  if (target != "safetensors" && target != "routes" && target != "manifest" && target != "request") {
    std::fprintf(stderr, "unknown fuzz target '%s' (safetensors | routes | manifest | request)\n", target.c_str());
    std::exit(2);
  }
  char tmpl[] = "/tmp/adafuse-fuzz-XXXXXX";
  work = ::mkdtemp(tmpl);
  prepare_engine_folder();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (target_name.empty()) setup(std::getenv("FUZZ_TARGET") ? std::getenv("FUZZ_TARGET") : "safetensors");
  run_one(std::string(reinterpret_cast<const char*>(data), size));
  return 0;
}

#ifndef ADAFUSE_LIBFUZZER
int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s safetensors|routes|manifest|request [--seconds N] [--seed S]\n", argv[0]);
    return 2;
  }
  double seconds = 10;
  uint64_t seed = 24;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--seconds") == 0) seconds = std::atof(argv[i + 1]);
    if (std::strcmp(argv[i], "--seed") == 0) seed = std::strtoull(argv[i + 1], nullptr, 10);
  }
  if (const char* env = std::getenv("ADAFUSE_FUZZ_SECONDS")) seconds = std::atof(env);
  setup(argv[1]);
  __sanitizer_set_death_callback(on_death);
  std::vector<std::string> corpus = seeds();
  for (const auto& s : corpus) run_one(s);
  std::mt19937_64 rng(seed);
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  size_t runs = 0;
  while (std::chrono::steady_clock::now() < end) {
    const std::string input = mutate(corpus[static_cast<size_t>(rng() % corpus.size())], rng, corpus);
    run_one(input);
    ++runs;
    // Keep a few mutants as parents, so mutations stack (a small corpus, no coverage feedback).
    if (corpus.size() < 64 && rng() % 16 == 0) corpus.push_back(input);
    else if (rng() % 64 == 0) corpus[static_cast<size_t>(rng() % corpus.size())] = input;
  }
  std::error_code ec;
  fs::remove_all(work, ec);
  std::printf("fuzz %s: %zu inputs in %.0f s (seed %llu), no finding\n", target_name.c_str(), runs, seconds,
              static_cast<unsigned long long>(seed));
  return 0;
}
#endif
