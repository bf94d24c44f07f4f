// Manifest checks: every refusal of Python's verify_engine, with its wording, and the decoder contract.
#include "engine_fixture.h"
#include "engine_layout.h"
#include "manifest.h"

namespace adafuse::testing {
namespace {

TEST(Sha256, MatchesTheStandardTestVectors) {
  TempDir dir;
  write_file(dir / "abc", "abc");
  write_file(dir / "empty", "");
  // FIPS 180-2 examples.
  EXPECT_EQ(sha256_file(dir / "abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_file(dir / "empty"), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  write_file(dir / "million", std::string(1000000, 'a'));
  EXPECT_EQ(sha256_file(dir / "million"), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Manifest, ReadsAGoodManifest) {
  EngineFixture f;
  const Manifest m = verify_engine(f.engine());
  EXPECT_EQ(m.backend, "tensorrt");
  EXPECT_EQ(m.max_batch, 2);
  EXPECT_EQ(m.max_seq, 16);
  EXPECT_EQ(m.top_k, 2);
  ASSERT_TRUE(m.plugin.has_value());
  EXPECT_EQ(m.plugin->version, "1");
  EXPECT_EQ(*m.routes_file, f.file("out.onnx/routes.safetensors"));
  const EngineLayout l = engine_layout(m);
  EXPECT_EQ(l.vocab, 8);
  EXPECT_EQ(l.layers, 2);
  EXPECT_EQ(l.kv_heads, 2);
  EXPECT_EQ(l.head_dim, 4);
  EXPECT_EQ(l.kv_dtype, "half");
  EXPECT_EQ(l.top_k, 2);
}

TEST(Manifest, RefusesAMissingManifest) {
  TempDir dir;
  write_file(dir / "x.engine", "e");
  expect_error([&] { verify_engine(dir / "x.engine"); }, ADAFUSE_ERR_FILE,
               (dir / "x.engine").string() + ": its manifest " + (dir / "x.json").string() +
                   " is missing (adafuse-export convert writes it beside the engine; the engine cannot be checked or "
                   "run without it: convert again)");
}

TEST(Manifest, RefusesBadJson) {
  EngineFixture f;
  write_file(f.manifest_path(), "{\"format\": ");
  expect_error_containing([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE, f.manifest_path().string() + ": invalid JSON at byte");
}

TEST(Manifest, RefusesAnotherFormat) {
  EngineFixture f;
  f.manifest["format"] = "onnx";
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": not an adafuse engine manifest (expected format 'adafuse-engine')");
}

TEST(Manifest, RefusesAnotherVersion) {
  EngineFixture f;
  f.manifest["version"] = 2;
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": manifest version 2 is not supported (expected 1)");
  f.manifest["version"] = "1";
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": manifest version '1' is not supported (expected 1)");
}

TEST(Manifest, RefusesAMissingEngine) {
  EngineFixture f;
  fs::remove(f.engine());
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE, f.engine().string() + ": engine file not found");
}

TEST(Manifest, RefusesAModifiedEngine) {
  EngineFixture f;
  const std::string want = f.manifest["engine"]["sha256"];
  write_file(f.engine(), "another engine");
  const std::string got = sha256_file(f.engine());
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.engine().string() + ": SHA-256 " + got.substr(0, 16) + "... does not match the manifest's " + want.substr(0, 16) +
                   "... (engine modified or replaced; rebuild it with adafuse-export convert)");
}

TEST(Manifest, RefusesAnotherPluginVersion) {
  EngineFixture f;
  f.manifest["plugin"]["version"] = "2";
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_PLUGIN,
               f.manifest_path().string() +
                   ": engine needs plugin AdafuseLoraLinear version '2', this adafuse-export provides version '1'");
}

TEST(Manifest, RefusesAMissingListedFile) {
  EngineFixture f;
  fs::remove(f.file("out.onnx/decoder.onnx"));
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.file("out.onnx/decoder.onnx").string() + ": file listed in out.json is missing");
  EXPECT_NO_THROW(verify_engine(f.engine(), false));  // the engine alone, as verify_engine(check_files=False)
}

TEST(Manifest, RefusesAModifiedListedFile) {
  EngineFixture f;
  write_file(f.file("out.onnx/decoder.onnx"), "edited graph");
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.file("out.onnx/decoder.onnx").string() + ": SHA-256 does not match out.json (file modified after conversion)");
}

TEST(Manifest, RefusesBadFields) {
  EngineFixture f;
  f.manifest["engine"]["max_batch"] = "eight";  // a type Python checks first, with its wording
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": 'engine.max_batch' must be int, found str \"eight\"");
  f.manifest["engine"]["max_batch"] = 0;  // the right type, a wrong value: the runtime's own field check
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": field 'engine.max_batch' must be a positive integer, found 0");
  EngineFixture g;
  g.manifest["tensors"].erase("outputs");
  g.save();
  expect_error([&] { verify_engine(g.engine()); }, ADAFUSE_ERR_FILE,
               g.manifest_path().string() + ": field 'tensors.outputs' must be a non-empty list, found null");
}

TEST(EngineLayout, RefusesExpertIdsWithoutARoutingTable) {
  EngineFixture f;
  f.manifest["routing"]["routes_file"] = nullptr;
  f.save();
  const Manifest m = verify_engine(f.engine());
  expect_error([&] { engine_layout(m); }, ADAFUSE_ERR_FILE,
               f.engine().string() + ": the engine takes expert ids but its manifest names no routing table");
}

TEST(EngineLayout, ReadsRoutesComputedInsideTheDecoder) {
  // Pre-gates that read past layer 0's attention run inside the decoder and return their routes.
  EngineFixture f;
  auto& t = f.manifest["tensors"];
  t["outputs"].push_back(t["inputs"][2]);
  t["outputs"].push_back(t["inputs"][3]);
  t["inputs"].erase(3);
  t["inputs"].erase(2);
  f.manifest["routing"]["routes_file"] = nullptr;
  f.save();
  const EngineLayout l = engine_layout(verify_engine(f.engine()));
  EXPECT_FALSE(l.routes_in);
  EXPECT_TRUE(l.routes_out);
  EXPECT_EQ(l.top_k, 2);
}

TEST(EngineLayout, RefusesAnUnexpectedTensorContract) {
  EngineFixture f;
  f.manifest["tensors"]["outputs"].erase(4);  // logits
  f.save();
  expect_error([&] { engine_layout(verify_engine(f.engine())); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": the engine has no output 'logits'");
  EngineFixture g;
  g.manifest["tensors"]["outputs"][1]["dtype"] = "float";  // present.0.value
  g.save();
  expect_error([&] { engine_layout(verify_engine(g.engine())); }, ADAFUSE_ERR_FILE,
               g.manifest_path().string() + ": output 'present.0.value' is float of rank 4, expected half of rank 4");
}

}  // namespace
}  // namespace adafuse::testing
