// Issue 24, classes 1 and 2 on the C++ side: hostile files (names leaving the engine folder, FIFOs,
// devices, sizes that overflow 64 bits, nesting) and garbage C API handles. Each test generates its
// cases and checks every one is refused with one line (never a hang, a crash or a huge read).
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <future>
#include <limits>
#include <utility>
#include <vector>

#include "engine_fixture.h"
#include "engine_layout.h"
#include "files.h"
#include "handles.h"
#include "manifest.h"
#include "routing.h"
#include "safetensors.h"

namespace adafuse::testing {
namespace {

// Runs fn on another thread; fails the test (instead of hanging ctest) when it takes over 10 s.
std::string refusal_within_deadline(const std::function<void()>& fn) {
  auto result = std::async(std::launch::async, [&]() -> std::string {
    try {
      fn();
      return "";
    } catch (const Error& e) {
      return e.what();
    }
  });
  if (result.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    ADD_FAILURE() << "blocked for 10 s";
    std::_Exit(1);  // the blocked thread cannot be joined
  }
  return result.get();
}

TEST(HostileManifest, ListedNamesStayInsideTheEngineFolder) {
  EngineFixture f;
  const fs::path dir = f.engine().parent_path();
  write_file(dir.parent_path() / (dir.filename().string() + "-secret.txt"), "secret");
  fs::create_symlink(dir.parent_path() / (dir.filename().string() + "-secret.txt"), dir / "link-out");
  fs::create_symlink("/etc/hostname", dir / "link-abs");
  const std::string mpath = f.manifest_path().string();
  const std::string outside = "; only files inside it may be named";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"../secret.txt", mpath + ": names '../secret.txt', a path outside " + dir.string() + outside},
      {"/etc/passwd", mpath + ": names '/etc/passwd', a path outside " + dir.string() + outside},
      {"out.onnx/../../x", mpath + ": names 'out.onnx/../../x', a path outside " + dir.string() + outside},
      {"a/b/../../../x", mpath + ": names 'a/b/../../../x', a path outside " + dir.string() + outside},
      {"..", mpath + ": names '..', a path outside " + dir.string() + outside},
      {"", mpath + ": expected a file name, found ''"},
      {std::string("x\0y", 3), mpath + ": names 'x\\x00y', a path outside " + dir.string() + outside},
      {"../a\nb", mpath + ": names '../a\\x0ab', a path outside " + dir.string() + outside},
      {"link-out", (dir / "link-out").string() + ": symbolic link to " +
                       (dir.parent_path() / (dir.filename().string() + "-secret.txt")).string() + ", outside " + dir.string() +
                       "; only links to files inside the checkpoint (or its Hugging Face cache folder) are followed"},
      {"link-abs", ""},  // resolves outside (message names the resolved target)
  };
  for (const auto& [name, message] : cases) {
    f.manifest["files"] = nlohmann::json::object();
    f.manifest["files"][name] = std::string(64, '0');
    f.save();
    const std::string got = refusal_within_deadline([&] { verify_engine(f.engine()); });
    if (message.empty()) EXPECT_NE(got.find(": symbolic link to "), std::string::npos) << name << ": " << got;
    else EXPECT_EQ(got, message) << name;
  }
}

TEST(HostileManifest, SpecialFilesAreNeverOpened) {
  EngineFixture f;
  const fs::path dir = f.engine().parent_path();
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
  fs::create_directories(dir / "subdir");
  // Listed: a FIFO, a directory, a link to /dev/zero (outside) and a link to a FIFO inside.
  fs::create_symlink(dir / "fifo", dir / "link-fifo");
  for (const std::string name : {"fifo", "subdir", "link-fifo"}) {
    f.manifest["files"] = {{name, std::string(64, '0')}};
    f.save();
    EXPECT_EQ(refusal_within_deadline([&] { verify_engine(f.engine()); }),
              (dir / name).string() + ": file listed in out.json is missing");
  }
  // The manifest itself, the routing table and any file hashed: FIFO, device, directory.
  const std::vector<std::pair<fs::path, std::string>> specials = {
      {dir / "fifo", "FIFO (named pipe)"}, {"/dev/zero", "character device"}, {dir / "subdir", "directory"}};
  for (const auto& [path, kind] : specials) {
    EXPECT_EQ(refusal_within_deadline([&] { read_json(path); }), path.string() + ": expected a JSON file, found a " + kind);
    EXPECT_EQ(refusal_within_deadline([&] { RoutingTable t(path); }),
              path.string() + ": expected a safetensors file, found a " + kind);
    EXPECT_EQ(refusal_within_deadline([&] { sha256_file(path); }), path.string() + ": expected a file, found a " + kind);
  }
  // An engine path whose manifest is a FIFO, or a link to /dev/zero.
  fs::create_symlink(dir / "fifo", dir / "e1.json");
  fs::create_symlink("/dev/zero", dir / "e2.json");
  EXPECT_EQ(refusal_within_deadline([&] { verify_engine(dir / "e1.engine"); }),
            (dir / "e1.json").string() + ": expected a JSON file, found a FIFO (named pipe)");
  EXPECT_EQ(refusal_within_deadline([&] { verify_engine(dir / "e2.engine"); }),
            (dir / "e2.json").string() + ": expected a JSON file, found a character device");
  // The routing table named by the manifest: confined like the listed files.
  f.manifest["files"] = nlohmann::json::object();
  f.manifest["routing"]["routes_file"] = "../routes.safetensors";
  f.save();
  EXPECT_EQ(refusal_within_deadline([&] { verify_engine(f.engine()); }),
            f.manifest_path().string() + ": names '../routes.safetensors', a path outside " + dir.string() +
                "; only files inside it may be named");
}

TEST(HostileManifest, SizesAndNestingAreBounded) {
  TempDir dir;
  const fs::path p = dir / "deep.json";
  for (int depth : {32, 33, 1000, 200000}) {
    write_file(p, std::string(static_cast<size_t>(depth), '[') + std::string(static_cast<size_t>(depth), ']'));
    if (depth <= 32) {
      EXPECT_NO_THROW(read_json(p));
    } else {
      expect_error([&] { read_json(p); }, ADAFUSE_ERR_FILE, p.string() + ": JSON nested deeper than 32 levels");
    }
    write_file(p, std::string(static_cast<size_t>(depth), '['));  // unclosed
    EXPECT_NE(refusal_within_deadline([&] { read_json(p); }), "");
  }
  // 32 levels counting the scalar leaf as Python's _depth does.
  write_file(p, std::string(31, '[') + "1" + std::string(31, ']'));
  EXPECT_NO_THROW(read_json(p));
  write_file(p, std::string(32, '[') + "1" + std::string(32, ']'));
  expect_error([&] { read_json(p); }, ADAFUSE_ERR_FILE, p.string() + ": JSON nested deeper than 32 levels");
  write_file(p, R"({"a": 1e309})");  // beyond double: nlohmann's out_of_range, refused as bad JSON
  expect_error_containing([&] { read_json(p); }, ADAFUSE_ERR_FILE, p.string() + ": invalid JSON: ");
  write_file(p, std::string(100, ' '));
  expect_error([&] { read_bytes(p, "JSON file", 10); }, ADAFUSE_ERR_FILE,
               p.string() + ": 100 bytes, more than the 10 a JSON file may have");
}

TEST(HostileManifest, FieldsOfTheWrongTypeAreRefusedAsPythonDoes) {
  EngineFixture f;
  const std::string mpath = f.manifest_path().string();
  const std::vector<std::tuple<std::string, nlohmann::json, std::string>> cases = {
      {"engine", 5, mpath + ": 'engine' must be an object, found int"},
      {"engine", "x", mpath + ": 'engine' must be an object, found str"},
      {"plugin", nlohmann::json::array(), mpath + ": 'plugin' must be an object, found list"},
      {"plugin", {{"name", "Evil"}, {"version", "1"}},
       mpath + ": engine needs plugin 'Evil', this adafuse-export provides AdafuseLoraLinear and AdafuseSwitchLinear"},
      {"files", {{"out.onnx/decoder.onnx", 5}}, mpath + ": 'files' must map file names to SHA-256 strings"},
      {"files", nlohmann::json::array(), mpath + ": 'files' must map file names to SHA-256 strings"},
      {"files", nullptr, mpath + ": 'files' must map file names to SHA-256 strings"},
  };
  for (const auto& [key, value, message] : cases) {
    EngineFixture g;
    g.manifest[key] = value;
    g.save();
    try {
      verify_engine(g.engine());
      ADD_FAILURE() << key << " " << value.dump();
    } catch (const Error& e) {
      std::string got = e.what();
      const std::string gpath = g.manifest_path().string();
      EXPECT_EQ(got, gpath + message.substr(mpath.size())) << key << " " << value.dump();
    }
  }
  // The field types Python checks before hashing (trt/manifest.py FIELD_TYPES), with its wording.
  const std::vector<std::tuple<std::string, std::string, nlohmann::json, std::string>> typed = {
      {"engine", "sha256", nlohmann::json::array({1, 2}), "'engine.sha256' must be str, found list [1, 2]"},
      {"engine", "max_batch", true, "'engine.max_batch' must be int, found bool true"},
      {"engine", "max_seq", 1.5, "'engine.max_seq' must be int, found float 1.5"},
      {"routing", "routes_file", 5, "'routing.routes_file' must be str or null, found int 5"},
      {"routing", "kind", {{"a", "\u00e9\n"}}, "'routing.kind' must be str, found dict {\"a\": \"\\u00e9\\n\"}"},
      {"source", "path", std::string(100, 'x'), "'source.path' must be str, found str"},
  };
  for (const auto& [section, key, value, message] : typed) {
    EngineFixture g;
    g.manifest[section][key] = value;
    g.save();
    if (key == "path") {  // a string is a string: no refusal
      EXPECT_NO_THROW(verify_engine(g.engine()));
      continue;
    }
    expect_error([&] { verify_engine(g.engine()); }, ADAFUSE_ERR_FILE, g.manifest_path().string() + ": " + message);
  }
  {  // one file under two spellings is refused before anything is hashed
    EngineFixture g;
    g.manifest["files"]["./out.onnx//decoder.onnx"] = g.manifest["files"]["out.onnx/decoder.onnx"];
    g.save();
    expect_error([&] { verify_engine(g.engine()); }, ADAFUSE_ERR_FILE,
                 g.manifest_path().string() + ": 'files' lists one file twice ('./out.onnx//decoder.onnx' and 'out.onnx/decoder.onnx')");
  }
  // Numbers the backend multiplies into buffer sizes: every product checked in 64 bits.
  for (const auto& [name, shape] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"logits", {-1, -1, int64_t(1) << 62}}, {"kv", {-1, int64_t(1) << 31, -1, 4}}, {"kv", {-1, 1 << 20, -1, 1 << 20}}}) {
    EngineFixture g;
    for (auto& t : g.manifest["tensors"][name == "logits" ? "outputs" : "inputs"])
      if (t["name"] == (name == "logits" ? "logits" : "past_key_values.0.key")) t["shape"] = shape;
    g.manifest["engine"]["max_seq"] = INT32_MAX;
    g.save();
    const Manifest m = verify_engine(g.engine());
    expect_error_containing([&] { engine_layout(m); }, ADAFUSE_ERR_FILE, g.manifest_path().string() + ": ");
  }
}

std::string header_file(const std::string& header, size_t data_bytes) { return safetensors_with_header(header, std::string(data_bytes, '\0')); }

TEST(HostileSafetensors, ShapesOffsetsAndLengthsAreChecked) {
  TempDir dir;
  const fs::path p = dir / "t.safetensors";
  const std::string at = p.string() + ": tensor 'a': ";
  const std::string shape_msg = "shape must be a list of at most 8 non-negative integers no larger than the file, found ";
  struct Case {
    std::string header;
    size_t data;
    std::string message;  // empty: any one-line refusal
  };
  const std::vector<Case> cases = {
      // The issue's file: 4 * 2^40 * 2^24 wraps to 0 in 64 bits.
      {R"({"a":{"dtype":"F32","shape":[1099511627776,16777216],"data_offsets":[0,0]}})", 0,
       at + shape_msg + "[1099511627776,16777216]"},
      {R"({"a":{"dtype":"F32","shape":[4096,4096,4096,4096,4096,4096],"data_offsets":[0,0]}})", 4096,
       at + "shape [4096,4096,4096,4096,4096,4096] of F32 has more bytes than 64 bits count"},
      {R"({"a":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}})", 1, at + shape_msg + "[1,1,1,1,1,1,1,1,1]"},
      {R"({"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", 1, at + shape_msg + "[1.5]"},
      {R"({"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}})", 1, at + shape_msg + "[true]"},
      {R"({"a":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", 1, at + shape_msg + "\"1\""},
      {R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}})", 1,
       at + "data_offsets [0,18446744073709551615] lie outside the 1 data bytes (file truncated?)"},
      {R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,0]}})", 1, ""},
      {R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", 1, at + "data_offsets [-1,0] lie outside the 1 data bytes (file truncated?)"},
      {R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", 1, at + "data_offsets must be two integers, found [0,1,2]"},
      {R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1e3]}})", 1, at + "data_offsets must be two integers, found [0,1000.0]"},
      {R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})", 3,
       p.string() + ": tensors 'a' and 'b' overlap (data_offsets share bytes 1..2)"},
      {R"({"__metadata__":{"k":1}})", 0, p.string() + ": corrupt safetensors header: __metadata__ must map strings to strings"},
      {R"({"__metadata__":[]})", 0, p.string() + ": corrupt safetensors header: __metadata__ must map strings to strings"},
      {"{\"a\":" + std::string(100, '[') + std::string(100, ']') + "}", 0,
       p.string() + ": corrupt safetensors header: nested deeper than 32 levels"},
      {std::string(200000, '['), 0, p.string() + ": corrupt safetensors header: nested deeper than 32 levels"},
      {"{\"a\":1", 0, ""},
      {"\xff\xfe", 0, ""},
  };
  for (const auto& c : cases) {
    write_file(p, header_file(c.header, c.data));
    const std::string got = refusal_within_deadline([&] { SafetensorsFile f(p); });
    if (c.message.empty()) EXPECT_EQ(got.rfind(p.string() + ": ", 0), 0u) << c.header << " -> " << got;
    else EXPECT_EQ(got, c.message) << c.header;
    EXPECT_EQ(got.find('\n'), std::string::npos) << got;
  }
  // Header length fields beyond the file or the 100 MB limit, up to 2^64 - 1.
  for (uint64_t n : {uint64_t(9), uint64_t(1) << 32, uint64_t(1) << 63, ~uint64_t(0)}) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
    write_file(p, bytes + "{}");
    expect_error([&] { SafetensorsFile f(p); }, ADAFUSE_ERR_FILE,
                 p.string() + ": corrupt safetensors file: header length " + std::to_string(n) + " is larger than the 2 bytes after it");
  }
}

TEST(HostileRoutes, ExpertIdsGatesAndShapesAreChecked) {
  TempDir dir;
  const fs::path p = dir / "r.safetensors";
  std::vector<int32_t> ids = {0, 1, 2, 3};
  std::vector<float> gates = {0.5f, 0.5f, 0.5f, 0.5f};
  write_file(p, safetensors_bytes({{"expert_ids", "I32", {2, 2}, bytes_of(ids)}, {"gates", "F32", {2, 2}, bytes_of(gates)}}));
  EXPECT_NO_THROW(RoutingTable t(p, 4));
  EXPECT_NO_THROW(RoutingTable t(p));
  for (int64_t experts : {1, 2, 3}) {
    const int64_t bad = 4 - experts;
    expect_error([&] { RoutingTable t(p, experts); }, ADAFUSE_ERR_FILE,
                 p.string() + ": routing table 'expert_ids': expert id " + std::to_string(experts) + " is out of range [0, " +
                     std::to_string(experts) + ") (" + std::to_string(bad) +
                     " of 4 ids); the adapter kernels would read outside the expert weights");
  }
  ids[3] = -7;
  write_file(p, safetensors_bytes({{"expert_ids", "I32", {2, 2}, bytes_of(ids)}, {"gates", "F32", {2, 2}, bytes_of(gates)}}));
  expect_error([&] { RoutingTable t(p); }, ADAFUSE_ERR_FILE, p.string() + ": expert_ids holds -7, expected ids >= 0");
  // Gates: finite (runners/base.py read_routes' wording) and in [0, 1], as the pre-gate's softmax makes them.
  ids[3] = 3;
  for (float g : {std::nanf(""), std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
    std::vector<float> bad = gates;
    bad[2] = g;
    write_file(p, safetensors_bytes({{"expert_ids", "I32", {2, 2}, bytes_of(ids)}, {"gates", "F32", {2, 2}, bytes_of(bad)}}));
    expect_error([&] { RoutingTable t(p, 4); }, ADAFUSE_ERR_FILE, p.string() + ": 'gates' holds NaN/Inf values, expected finite weights");
  }
  for (const auto& [bad, n] : std::vector<std::pair<std::vector<float>, int>>{{{0.5f, -0.25f, 0.5f, 0.5f}, 1},
                                                                              {{1.5f, 0.5f, 1.0000001f, 0.0f}, 2}}) {
    write_file(p, safetensors_bytes({{"expert_ids", "I32", {2, 2}, bytes_of(ids)}, {"gates", "F32", {2, 2}, bytes_of(bad)}}));
    expect_error([&] { RoutingTable t(p, 4); }, ADAFUSE_ERR_FILE,
                 p.string() + ": 'gates' holds " + std::to_string(n) +
                     " of 4 weights outside [0, 1]; a routing table holds the pre-gate's softmax weights");
  }
  const std::vector<float> edges = {0.0f, 1.0f, -0.0f, 0.25f};  // the bounds themselves are weights
  write_file(p, safetensors_bytes({{"expert_ids", "I32", {2, 2}, bytes_of(ids)}, {"gates", "F32", {2, 2}, bytes_of(edges)}}));
  EXPECT_NO_THROW(RoutingTable t(p, 4));
  write_file(p, safetensors_bytes({{"expert_ids", "I32", {2, 2}, bytes_of(ids)}}));
  expect_error([&] { RoutingTable t(p); }, ADAFUSE_ERR_FILE, p.string() + ": tensor 'gates' not found");
  write_file(p, safetensors_bytes({{"expert_ids", "I32", {1, 2000}, std::string(8000, '\0')}, {"gates", "F32", {1, 2000}, std::string(8000, '\0')}}));
  expect_error([&] { RoutingTable t(p); }, ADAFUSE_ERR_FILE, p.string() + ": expert_ids [1, 2000]: top-k 2000 exceeds 1024");
  // The engine path: routing.num_experts bounds the table's ids.
  EngineFixture f;
  f.manifest["routing"]["num_experts"] = 2;  // the fixture's table holds ids 0..2
  f.save();
  EXPECT_EQ(verify_engine(f.engine(), false).num_experts, 2);
  f.manifest["routing"]["num_experts"] = -1;
  f.save();
  expect_error([&] { verify_engine(f.engine(), false); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": field 'routing.num_experts' must be a positive integer, found -1");
}

TEST(HostileCApi, GarbageHandlesAreRefused) {
  // A stack object, a heap block, a freed handle and a handle of another kind: never dereferenced.
  alignas(64) char stack[256] = {};
  auto heap = std::make_unique<char[]>(256);
  adafuse_sampling s = adafuse_sampling_default();
  adafuse_sampler* freed = nullptr;
  ASSERT_EQ(adafuse_sampler_create(&s, &freed), ADAFUSE_OK);
  adafuse_sampler* other = nullptr;  // made before `freed` is freed, so it cannot take its address
  ASSERT_EQ(adafuse_sampler_create(&s, &other), ADAFUSE_OK);
  adafuse_sampler_free(freed);
  std::vector<void*> garbage = {stack, heap.get(), freed, reinterpret_cast<void*>(uintptr_t(0xdeadbeef)),
                                reinterpret_cast<void*>(uintptr_t(8)), reinterpret_cast<void*>(~uintptr_t(0) - 15)};
  const int64_t ids[1] = {0};
  float logits[8] = {};
  int32_t expert_ids[8];
  float gates[8];
  int64_t token = 0, vocab = -1, out_tokens[8];
  int32_t top_k = -1, lengths[1], a = -1, b = -1;
  const adafuse_generate_options options = adafuse_generate_options_default();
  for (void* g : garbage) {
    auto* routes = static_cast<adafuse_routes*>(g);
    auto* engine = static_cast<adafuse_engine*>(g);
    auto* sampler = static_cast<adafuse_sampler*>(g);
    EXPECT_EQ(adafuse_routes_lookup(routes, ids, 1, expert_ids, gates), ADAFUSE_ERR_INVALID_ARGUMENT);
    EXPECT_STREQ(adafuse_last_error(), "routes: not a live handle from adafuse_routes_open (freed already, or not made by this library)");
    adafuse_routes_shape(routes, &vocab, &top_k);
    EXPECT_EQ(vocab, 0);
    EXPECT_EQ(top_k, 0);
    EXPECT_EQ(adafuse_sampler_next(sampler, logits, 8, &token), ADAFUSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(adafuse_generate(engine, ids, 1, 1, &options, out_tokens, lengths), ADAFUSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(adafuse_prefill(engine, ids, 1, 1, logits, nullptr, nullptr), ADAFUSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(adafuse_decode(engine, ids, 1, logits, nullptr, nullptr), ADAFUSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(adafuse_read_kv(engine, 0, 0, logits), ADAFUSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(adafuse_past_length(engine), 0);
    adafuse_engine_limits(engine, &a, &b, &vocab);
    adafuse_kv_shape(engine, &a, &b, &top_k);
    EXPECT_EQ(a, 0);
    EXPECT_STREQ(adafuse_manifest_json(static_cast<adafuse_manifest*>(g)), "");
    // Frees of unknown pointers are ignored (a double free included).
    adafuse_routes_free(routes);
    adafuse_engine_free(engine);
    adafuse_sampler_free(sampler);
    adafuse_manifest_free(static_cast<adafuse_manifest*>(g));
  }
  // A live handle of one kind passed as another kind.
  EXPECT_EQ(adafuse_routes_lookup(reinterpret_cast<adafuse_routes*>(other), ids, 1, expert_ids, gates), ADAFUSE_ERR_INVALID_ARGUMENT);
  adafuse_engine_free(reinterpret_cast<adafuse_engine*>(other));  // ignored: not an engine
  EXPECT_EQ(adafuse_sampler_next(other, logits, 8, &token), ADAFUSE_OK);
  adafuse_sampler_free(other);
  EXPECT_EQ(adafuse_sampler_next(other, logits, 8, &token), ADAFUSE_ERR_INVALID_ARGUMENT);
}

}  // namespace
}  // namespace adafuse::testing
