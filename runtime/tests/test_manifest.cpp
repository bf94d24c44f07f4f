// Manifest checks: every refusal of Python's verify_engine, with its wording, and the decoder contract.
#include <algorithm>

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
  f.manifest["version"] = 1;  // one length per batch (position_ids): convert again
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": manifest version 1 is not supported (expected 2)");
  f.manifest["version"] = "2";
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": manifest version '2' is not supported (expected 2)");
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

TEST(Manifest, ReadsWhetherTheEngineIsVersionCompatible) {
  EngineFixture f;
  EXPECT_FALSE(verify_engine(f.engine()).version_compatible);  // absent: an engine for the full libnvinfer
  f.manifest["engine"]["version_compatible"] = true;
  f.save();
  EXPECT_TRUE(verify_engine(f.engine()).version_compatible);
  f.manifest["engine"]["version_compatible"] = false;
  f.save();
  EXPECT_FALSE(verify_engine(f.engine()).version_compatible);
  f.manifest["engine"]["version_compatible"] = "yes";  // Python's type check, word for word
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": 'engine.version_compatible' must be bool, found str \"yes\"");
  f.manifest["engine"]["version_compatible"] = 1;
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": 'engine.version_compatible' must be bool, found int 1");
}

TEST(Manifest, ReadsWhetherTheCacheIsUpdatedInPlace) {
  EngineFixture f;
  EXPECT_FALSE(verify_engine(f.engine()).kv_in_place);  // absent (every manifest before the field): a copied cache
  f.manifest["engine"]["kv_in_place"] = true;
  f.save();
  EXPECT_TRUE(verify_engine(f.engine()).kv_in_place);
  f.manifest["engine"]["kv_in_place"] = "true";  // Python's type check, word for word
  f.save();
  expect_error([&] { verify_engine(f.engine()); }, ADAFUSE_ERR_FILE,
               f.manifest_path().string() + ": 'engine.kv_in_place' must be bool, found str \"true\"");
}

// The fixture's engine as convert describes one whose cache is updated in place: every cache tensor's axis is
// max_seq (16), engine.kv_in_place true.
void update_in_place(EngineFixture& f) {
  for (const char* io : {"inputs", "outputs"})
    for (auto& t : f.manifest["tensors"][io])
      if (t["shape"].size() == 4) t["shape"] = {-1, 2, 16, 4};
  f.manifest["engine"]["kv_in_place"] = true;
  f.save();
}

TEST(EngineLayout, AnInPlaceEngineBindsEachPresentWhereItsPastIs) {
  EngineFixture copy;
  const EngineLayout c = engine_layout(verify_engine(copy.engine()));
  EXPECT_FALSE(c.kv_in_place);
  EXPECT_EQ(c.cache_buffers(), 2);  // ping-pong
  EngineFixture f;
  update_in_place(f);
  const EngineLayout l = engine_layout(verify_engine(f.engine()));
  EXPECT_TRUE(l.kv_in_place);
  EXPECT_EQ(l.cache_buffers(), 1);
  for (const EngineLayout* layout : {&c, &l}) {
    const std::vector<TensorBinding> bindings = step_bindings(*layout, 2, 3);
    int32_t caches = 0;
    for (const TensorBinding& t : bindings) {
      if (t.layer < 0) {
        EXPECT_FALSE(t.other_cache) << t.name;
        continue;
      }
      ++caches;
      EXPECT_EQ(t.shape, (std::vector<int64_t>{2, 2, 16, 4})) << t.name;  // the whole cache of rows 0..1
      // a copy engine's present goes to the other cache; in place it is bound where its past is, as is every input
      EXPECT_EQ(t.other_cache, !t.input && !layout->kv_in_place) << t.name;
    }
    EXPECT_EQ(caches, 2 * 2 * 2);  // layers x {key, value} x {past, present}
  }
}

TEST(EngineLayout, RefusesAnInPlaceEngineWhosePresentIsNotItsPast) {
  EngineFixture dynamic;  // a copy engine's graph (the cache axis dynamic) said to be in place
  dynamic.manifest["engine"]["kv_in_place"] = true;
  dynamic.save();
  expect_error([&] { engine_layout(verify_engine(dynamic.engine())); }, ADAFUSE_ERR_FILE,
               dynamic.manifest_path().string() + ": input 'past_key_values.0.key' has a dynamic cache axis; an in-place "
                                                   "cache (engine.kv_in_place) needs it static, max_seq 16 positions: "
                                                   "convert the model again");
  EngineFixture one;  // only a present's cache axis dynamic
  update_in_place(one);
  one.manifest["tensors"]["outputs"][3]["shape"] = {-1, 2, -1, 4};  // present.1.value
  one.save();
  expect_error([&] { engine_layout(verify_engine(one.engine())); }, ADAFUSE_ERR_FILE,
               one.manifest_path().string() + ": output 'present.1.value' has a dynamic cache axis; an in-place cache "
                                               "(engine.kv_in_place) needs it static, max_seq 16 positions: convert the "
                                               "model again");
  EngineFixture batch;  // another shape: a present of a fixed batch
  update_in_place(batch);
  batch.manifest["tensors"]["outputs"][2]["shape"] = {2, 2, 16, 4};  // present.1.key
  batch.save();
  expect_error([&] { engine_layout(verify_engine(batch.engine())); }, ADAFUSE_ERR_FILE,
               batch.manifest_path().string() + ": output 'present.1.key' has shape [2, 2, 16, 4], input "
                                                 "'past_key_values.1.key' [-1, 2, 16, 4]: an in-place cache "
                                                 "(engine.kv_in_place) needs them equal; convert the model again");
  EngineFixture dtype;  // another dtype: refused as for any engine, naming the tensor
  update_in_place(dtype);
  dtype.manifest["tensors"]["outputs"][0]["dtype"] = "float";  // present.0.key
  dtype.save();
  expect_error([&] { engine_layout(verify_engine(dtype.engine())); }, ADAFUSE_ERR_FILE,
               dtype.manifest_path().string() + ": output 'present.0.key' is float of rank 4, expected half of rank 4");
}

TEST(EngineLayout, RefusesExpertIdsWithoutARoutingTable) {
  EngineFixture f;
  f.manifest["routing"]["routes_file"] = nullptr;
  f.save();
  const Manifest m = verify_engine(f.engine());
  expect_error([&] { engine_layout(m); }, ADAFUSE_ERR_FILE,
               f.engine().string() + ": the engine takes expert ids but its manifest names no routing table");
}

// The fixture's engine turned into one whose pre-gate reads past layer 0's attention: it runs inside the decoder
// and returns its routes (expert ids and gates become outputs; no routing table).
void route_inside_the_decoder(EngineFixture& f) {
  auto& t = f.manifest["tensors"];
  t["outputs"].push_back(t["inputs"][3]);
  t["outputs"].push_back(t["inputs"][4]);
  t["inputs"].erase(4);
  t["inputs"].erase(3);
  f.manifest["routing"]["routes_file"] = nullptr;
  f.save();
}

TEST(EngineLayout, ReadsRoutesComputedInsideTheDecoder) {
  EngineFixture f;
  route_inside_the_decoder(f);
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
  EngineFixture h;  // an engine of the first contract: one position per token, no length per row
  h.manifest["tensors"]["inputs"][1] = {{"name", "position_ids"}, {"dtype", "int64"}, {"shape", {-1, -1}}};
  h.save();
  expect_error([&] { engine_layout(verify_engine(h.engine())); }, ADAFUSE_ERR_FILE,
               h.manifest_path().string() + ": the engine has no input 'past_lengths'");
  EngineFixture c;  // a cache axis fixed at another length than max_seq (16) cannot bind the whole cache
  c.manifest["tensors"]["inputs"][5]["shape"] = {-1, 2, 8, 4};  // past_key_values.0.key
  c.save();
  expect_error([&] { engine_layout(verify_engine(c.engine())); }, ADAFUSE_ERR_FILE,
               c.manifest_path().string() +
                   ": input 'past_key_values.0.key' holds 8 positions, expected a dynamic axis or max_seq 16");
}

TEST(EngineLayout, RefusesProfilesThatDoNotTakeTheWholeCache) {
  // convert records each profile's shapes; an engine of the first contract had a decode cache of max_seq - 1
  using nlohmann::json;
  EngineFixture good;
  const json whole = json::array({{1, 2, 1, 4}, {2, 2, 16, 4}, {2, 2, 16, 4}});
  good.manifest["profiles"][0]["shapes"] = {{"past_key_values.0.key", whole}};
  good.manifest["profiles"][1]["shapes"] = {{"past_key_values.0.key", whole}};
  good.save();
  EXPECT_EQ(engine_layout(verify_engine(good.engine())).max_seq, 16);
  EngineFixture old;
  old.manifest["profiles"][1]["shapes"] = {
      {"past_key_values.0.key", json::array({{1, 2, 1, 4}, {2, 2, 8, 4}, {2, 2, 15, 4}})}};
  old.save();
  expect_error([&] { engine_layout(verify_engine(old.engine())); }, ADAFUSE_ERR_FILE,
               old.manifest_path().string() +
                   ": profile 1 of 'past_key_values.0.key' takes batch 1..2 and cache length 1..15; the runtime binds "
                   "batch 1..2 over the whole cache (16 positions): convert the model again");
  EngineFixture bad;
  bad.manifest["profiles"][0]["shapes"] = {{"past_key_values.0.key", json::array({{1, 2}, {2, 2}, {2, 2}})}};
  bad.save();
  expect_error([&] { engine_layout(verify_engine(bad.engine())); }, ADAFUSE_ERR_FILE,
               bad.manifest_path().string() +
                   ": profile 0 of 'past_key_values.0.key' must be [min, opt, max] shapes of rank 4, found [[1,2],[2,2],[2,2]]");
}

TEST(EngineStep, PadsRowsIntoTheSlotsBatch) {
  // Slot 2 decodes at position 5 while slot 0 prefills 3 tokens and wants all their logits; slot 1 rides along.
  EngineFixture f;
  f.manifest["engine"]["max_batch"] = 4;
  f.save();
  const EngineLayout l = engine_layout(verify_engine(f.engine()));
  const int64_t ids[] = {7, 1, 2, 3};
  const StepRow rows[] = {{2, 5, 1, false}, {0, 0, 3, true}};
  const EngineStep s = plan_step(l, ids, rows, 2);
  EXPECT_EQ(s.batch, 3);
  EXPECT_EQ(s.width, 3);
  EXPECT_EQ(s.profile, 0);
  EXPECT_EQ(s.ids, (std::vector<int64_t>{1, 2, 3, 0, 0, 0, 7, 0, 0}));
  EXPECT_EQ(s.past_lengths, (std::vector<int64_t>{0, 0, 5}));
  EXPECT_EQ(s.seq_lens, (std::vector<int64_t>{3, 0, 1}));
  ASSERT_EQ(s.logits.size(), 2u);
  EXPECT_EQ(s.logits[0].first, 6);  // slot 2's one position
  EXPECT_EQ(s.logits[0].count, 1);
  EXPECT_EQ(s.logits[1].first, 0);  // slot 0's three
  EXPECT_EQ(s.logits[1].count, 3);
  EXPECT_EQ(s.tokens[0].first, 6);
  EXPECT_EQ(s.tokens[1].count, 3);
  const StepRow last_only[] = {{1, 4, 2, false}};
  const EngineStep d = plan_step(l, ids, last_only, 1);
  EXPECT_EQ(d.batch, 2);
  EXPECT_EQ(d.logits[0].first, 3);  // row 1, column 1: its last token
  const StepRow decode[] = {{0, 9, 1, false}, {1, 2, 1, false}};
  EXPECT_EQ(plan_step(l, ids, decode, 2).profile, 1);
}

TEST(EngineStep, BindsEveryTensorOfTheManifest) {
  // The bindings name exactly the manifest's tensors, with the contract's shapes (the whole cache: max_seq).
  for (bool routes_out : {false, true}) {
    EngineFixture f;
    if (routes_out) route_inside_the_decoder(f);
    const Manifest m = verify_engine(f.engine());
    const EngineLayout l = engine_layout(m);
    std::vector<std::string> inputs, outputs;
    for (const TensorBinding& b : step_bindings(l, 2, 3)) {
      (b.input ? inputs : outputs).push_back(b.name);
      const TensorDesc* d = b.input ? m.input(b.name) : m.output(b.name);
      ASSERT_NE(d, nullptr) << b.name;
      ASSERT_EQ(d->shape.size(), b.shape.size()) << b.name;
      for (size_t i = 0; i < b.shape.size(); ++i)  // a fixed axis of the manifest is the binding's
        if (d->shape[i] != -1) {
          EXPECT_EQ(d->shape[i], b.shape[i]) << b.name << " axis " << i;
        }
      EXPECT_EQ(b.shape[0], 2) << b.name;
      if (b.layer >= 0) {
        EXPECT_EQ(b.shape[2], 16) << b.name;
        EXPECT_EQ(b.name, std::string(b.input ? "past_key_values." : "present.") + std::to_string(b.layer) +
                              (b.value ? ".value" : ".key"));
      } else if (b.shape.size() > 1) {
        EXPECT_EQ(b.shape[1], 3) << b.name;
      }
    }
    EXPECT_EQ(inputs.size(), m.inputs.size());
    EXPECT_EQ(outputs.size(), m.outputs.size());
    for (const TensorDesc& d : m.inputs) EXPECT_NE(std::find(inputs.begin(), inputs.end(), d.name), inputs.end()) << d.name;
    for (const TensorDesc& d : m.outputs) EXPECT_NE(std::find(outputs.begin(), outputs.end(), d.name), outputs.end()) << d.name;
  }
}

}  // namespace
}  // namespace adafuse::testing
