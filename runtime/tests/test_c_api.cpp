// The C API: status codes and messages at the boundary, generation with a streaming callback, and
// opening an engine up to the first step this machine cannot take (TensorRT itself, a GPU).
#include <cstdlib>
#include <map>
#include <random>

#include "adafuse/runtime.h"
#include "engine_fixture.h"
#include "engine_handle.h"
#include "history_backend_for_tests.h"
#include "replay_backend_for_tests.h"

namespace adafuse::testing {
namespace {

adafuse_engine* replay_engine(const TempDir& dir) {
  std::vector<float> logits(6 * 4);
  for (size_t p = 0; p < 6; ++p) logits[p * 4 + (p + 1) % 4] = 1.0f;  // position p peaks at (p + 1) % 4
  write_file(dir / "l.safetensors", safetensors_bytes({{"logits", "F32", {1, 6, 4}, bytes_of(logits)}}));
  return adafuse::make_engine_handle(std::make_unique<ReplayBackendForTests>(dir / "l.safetensors", 2, 6));
}

TEST(CApi, GeneratesAndStreams) {
  TempDir dir;
  adafuse_engine* engine = replay_engine(dir);
  int32_t max_batch = 0, max_seq = 0;
  int64_t vocab = 0;
  adafuse_engine_limits(engine, &max_batch, &max_seq, &vocab);
  EXPECT_EQ(max_batch, 2);
  EXPECT_EQ(max_seq, 6);
  EXPECT_EQ(vocab, 4);
  const int64_t prompts[] = {0, 1, 2, 3};  // two prompts of two tokens
  const int64_t stop[] = {0};
  std::vector<std::pair<int32_t, int64_t>> streamed;
  adafuse_generate_options o = adafuse_generate_options_default();
  o.max_new_tokens = 4;
  o.stop_ids = stop;
  o.num_stop_ids = 1;
  o.user = &streamed;
  o.on_token = [](void* user, int32_t s, int64_t t) {
    static_cast<std::vector<std::pair<int32_t, int64_t>>*>(user)->emplace_back(s, t);
    return 0;
  };
  int64_t tokens[8];
  int32_t lengths[2];
  ASSERT_EQ(adafuse_generate(engine, prompts, 2, 2, &o, tokens, lengths), ADAFUSE_OK) << adafuse_last_error();
  // positions 1, 2, 3 peak at 2, 3, 0 (a stop id): three tokens, then -1.
  EXPECT_EQ(std::vector<int64_t>(tokens, tokens + 8), (std::vector<int64_t>{2, 3, 0, -1, 2, 3, 0, -1}));
  EXPECT_EQ(lengths[0], 3);
  EXPECT_EQ(lengths[1], 3);
  EXPECT_EQ(streamed.size(), 6u);
  EXPECT_STREQ(adafuse_last_error(), "");

  o.max_new_tokens = 6;
  EXPECT_EQ(adafuse_generate(engine, prompts, 2, 2, &o, tokens, lengths), ADAFUSE_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(adafuse_last_error(), "prompt of 2 tokens + max_new_tokens 6 exceed the engine's profile (max_seq 6)");
  EXPECT_EQ(adafuse_generate(engine, nullptr, 2, 2, &o, tokens, lengths), ADAFUSE_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(adafuse_last_error(), "prompt_ids: NULL pointer");

  std::vector<float> logits(2 * 2 * 4);
  ASSERT_EQ(adafuse_prefill(engine, prompts, 2, 2, logits.data(), nullptr, nullptr), ADAFUSE_OK);
  EXPECT_EQ(logits[1], 1.0f);      // sequence 0, position 0 peaks at token 1
  EXPECT_EQ(logits[4 + 2], 1.0f);  // sequence 0, position 1 peaks at token 2
  EXPECT_EQ(adafuse_past_length(engine), 2);
  float kv[1];
  EXPECT_EQ(adafuse_read_kv(engine, 0, 0, kv), ADAFUSE_ERR_INVALID_ARGUMENT);
  double ms = -7.0;  // the replay backend has no GPU work to time: refused, the output untouched
  EXPECT_EQ(adafuse_last_step_gpu_time(engine, &ms), ADAFUSE_ERR_UNSUPPORTED);
  EXPECT_EQ(ms, -7.0);
  EXPECT_EQ(adafuse_last_step_gpu_time(engine, nullptr), ADAFUSE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(adafuse_last_step_gpu_time(nullptr, &ms), ADAFUSE_ERR_INVALID_ARGUMENT);
  adafuse_engine_free(engine);
}

TEST(CApi, GenerateChecksSizesBeforeReadingThePrompt) {
  TempDir dir;
  adafuse_engine* engine = replay_engine(dir);
  const int64_t prompt[1] = {1};  // one id: a larger batch or length must be refused, never read
  int64_t tokens[4];
  int32_t lengths[1];
  adafuse_generate_options o = adafuse_generate_options_default();
  o.max_new_tokens = 1;
  EXPECT_EQ(adafuse_generate(engine, prompt, INT32_MAX, 1, &o, tokens, lengths), ADAFUSE_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(adafuse_last_error(), "batch of 2147483647 sequences: the engine's profile takes 1 to 2");
  EXPECT_EQ(adafuse_generate(engine, prompt, 1, INT32_MAX, &o, tokens, lengths), ADAFUSE_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(adafuse_last_error(), "prompt of 2147483647 tokens is longer than the engine's profile (max_seq 6)");
  o.num_stop_ids = SIZE_MAX;
  o.stop_ids = prompt;
  EXPECT_EQ(adafuse_generate(engine, prompt, 1, 1, &o, tokens, lengths), ADAFUSE_ERR_INVALID_ARGUMENT);
  adafuse_engine_free(engine);
}

TEST(CApi, StepChecksRowsBeforeReadingThemAndNeedsAnInFlightEngine) {
  TempDir dir;
  adafuse_engine* engine = replay_engine(dir);  // equal-length batches only
  int32_t in_flight = -1, step_tokens = -1;
  adafuse_step_limits(engine, &in_flight, &step_tokens);
  EXPECT_EQ(in_flight, 0);
  EXPECT_EQ(step_tokens, 0);
  const int64_t ids[1] = {1};
  const adafuse_step_row row = {0, 0, 1, 0};
  float logits[4];
  EXPECT_EQ(adafuse_step(engine, ids, &row, INT32_MAX, logits, nullptr, nullptr), ADAFUSE_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(adafuse_last_error(), "step of 2147483647 sequences: the engine takes 1 to 2");
  EXPECT_EQ(adafuse_step(engine, ids, nullptr, 1, logits, nullptr, nullptr), ADAFUSE_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(adafuse_last_error(), "rows: NULL pointer");
  EXPECT_EQ(adafuse_step(engine, ids, &row, 1, logits, nullptr, nullptr), ADAFUSE_ERR_UNSUPPORTED);
  EXPECT_EQ(adafuse_slot_length(engine, 0), 0);
  EXPECT_EQ(adafuse_slot_length(engine, 5), 0);  // out of range: 0, no failure
  adafuse_engine_free(engine);
}

TEST(CApi, SamplerAndRoutesReportErrors) {
  adafuse_sampling s = adafuse_sampling_default();
  s.top_p = 2.0f;
  adafuse_sampler* sampler = nullptr;
  EXPECT_EQ(adafuse_sampler_create(&s, &sampler), ADAFUSE_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(adafuse_last_error(), "sampling top_p must be in (0, 1] (1: off), found 2.000000");
  adafuse_routes* routes = nullptr;
  EXPECT_EQ(adafuse_routes_open("/nonexistent/routes.safetensors", &routes), ADAFUSE_ERR_FILE);
  EXPECT_STREQ(adafuse_last_error(), "/nonexistent/routes.safetensors: file not found");
  EXPECT_STREQ(adafuse_plugin_version(), "1");
}

class OpenEngine : public ::testing::Test {
 protected:
  adafuse_status open(const char* trt, const char* plugin) {
    adafuse_open_options o = adafuse_open_options_default();
    engine_path_ = f.engine().string();
    o.engine_path = engine_path_.c_str();
    o.tensorrt_library = trt;
    o.plugin_library = plugin;
    adafuse_engine* engine = nullptr;
    const adafuse_status status = adafuse_engine_open(&o, &engine);
    EXPECT_EQ(engine, nullptr);
    return status;
  }
  // Past every check this machine can make: without a GPU, CUDA refuses; with one, the stand-in TensorRT
  // library creates no runtime.
  void expect_stops_at_the_gpu_or_the_runtime() {
    const adafuse_status status = open(NVINFER_101401, PLUGIN_STUB);
    const std::string message = adafuse_last_error();
    if (status == ADAFUSE_ERR_CUDA)
      EXPECT_EQ(message.rfind("CUDA device 0 (running " + f.engine().string() + " needs an NVIDIA GPU): ", 0), 0u) << message;
    else
      EXPECT_EQ(message, std::string(NVINFER_101401) + ": TensorRT 10.14.1 could not create a runtime");
  }
  EngineFixture f;
  std::string engine_path_;
};

TEST_F(OpenEngine, RefusesTheManifestFirst) {
  fs::remove(f.file("out.onnx/routes.safetensors"));
  EXPECT_EQ(open(NVINFER_101401, PLUGIN_STUB), ADAFUSE_ERR_FILE);
  EXPECT_EQ(adafuse_last_error(), f.file("out.onnx/routes.safetensors").string() + ": file listed in out.json is missing");
}

TEST_F(OpenEngine, RefusesTensorRTRtxEngines) {
  f.manifest["engine"]["backend"] = "tensorrt-rtx";
  f.manifest["engine"]["backend_version"] = "1.7.1.116";
  f.save();
  EXPECT_EQ(open(NVINFER_101401, PLUGIN_STUB), ADAFUSE_ERR_TENSORRT);
  EXPECT_EQ(adafuse_last_error(), f.engine().string() + ": built with tensorrt-rtx 1.7.1.116; this runtime runs full TensorRT "
                                                        "engines (convert with --backend tensorrt)");
}

TEST_F(OpenEngine, RefusesAnEngineBuiltByAnotherTensorRTBeforeDeserializing) {
  f.manifest["engine"]["backend_version"] = "10.13.0.35";
  f.save();
  EXPECT_EQ(open(NVINFER_101401, PLUGIN_STUB), ADAFUSE_ERR_TENSORRT);
  EXPECT_EQ(adafuse_last_error(), f.engine().string() + ": built with TensorRT 10.13.0.35, but " + NVINFER_101401 +
                                      " is TensorRT 10.14.1; an engine runs only on the TensorRT that built it (load TensorRT "
                                      "10.13.0, or convert it again with this one)");
}

TEST_F(OpenEngine, NeedsThePluginLibrary) {
  unsetenv("ADAFUSE_PLUGIN_LIB");
  EXPECT_EQ(open(NVINFER_101401, nullptr), ADAFUSE_ERR_PLUGIN);
  EXPECT_EQ(adafuse_last_error(), f.engine().string() + ": this engine uses the libadafuse_trt_plugins.so plugin library, which is not "
                                                        "installed beside the runtime; set ADAFUSE_PLUGIN_LIB to its path (or pass "
                                                        "plugin_library)");
  EXPECT_EQ(open(NVINFER_101401, NOT_A_PLUGIN_STUB), ADAFUSE_ERR_PLUGIN);
  setenv("ADAFUSE_PLUGIN_LIB", NOT_A_PLUGIN_STUB, 1);
  EXPECT_EQ(open(NVINFER_101401, nullptr), ADAFUSE_ERR_PLUGIN);  // the environment variable is read
  EXPECT_NE(std::string(adafuse_last_error()).find("not a TensorRT plugin library"), std::string::npos);
  unsetenv("ADAFUSE_PLUGIN_LIB");
}

TEST_F(OpenEngine, RefusesAnOldTensorRT) {
  EXPECT_EQ(open(NVINFER_8601, PLUGIN_STUB), ADAFUSE_ERR_TENSORRT);
  EXPECT_EQ(adafuse_last_error(),
            std::string(NVINFER_8601) + ": TensorRT 8.6.1 is too old; this runtime needs TensorRT 10.x (libnvinfer.so.10)");
}

TEST_F(OpenEngine, StopsAtTheGpuOrTheRuntime) {
  expect_stops_at_the_gpu_or_the_runtime();
}

// A version-compatible engine loads TensorRT's lean runtime, checked as libnvinfer is.
TEST_F(OpenEngine, LoadsTheLeanRuntimeForAVersionCompatibleEngine) {
  f.manifest["engine"]["version_compatible"] = true;
  f.manifest["engine"]["backend_version"] = "10.13.0.35";
  f.save();
  EXPECT_EQ(open(NVINFER_101401, PLUGIN_STUB), ADAFUSE_ERR_TENSORRT);
  EXPECT_EQ(adafuse_last_error(), f.engine().string() + ": version-compatible engine built with TensorRT 10.13.0.35, but " +
                                      NVINFER_101401 + " is the lean runtime of TensorRT 10.14.1; its plan leaves the lean runtime "
                                      "out, so it runs on the lean runtime of the TensorRT that built it (load TensorRT 10.13.0's "
                                      "libnvinfer_lean, or convert it again with this one)");
  EXPECT_EQ(open("/nonexistent/libnvinfer_lean.so.10", PLUGIN_STUB), ADAFUSE_ERR_TENSORRT);
  EXPECT_EQ(std::string(adafuse_last_error()).rfind("TensorRT lean runtime not found: a version-compatible engine needs ", 0), 0u);
  f.manifest["engine"]["backend_version"] = "10.14.1.48";
  f.save();
  expect_stops_at_the_gpu_or_the_runtime();
}

}  // namespace
}  // namespace adafuse::testing

// adafuse_generate_many: prompts of any lengths through in-flight batching, more prompts than slots.
namespace adafuse::testing {
namespace {

void expect_status(adafuse_status got, adafuse_status want, const std::string& message) {
  EXPECT_EQ(got, want);
  EXPECT_EQ(std::string(adafuse_last_error()), message);
}

HistoryBackendOptions many_options(bool in_flight) {
  HistoryBackendOptions o;
  o.max_batch = 3;
  o.max_seq = 80;
  o.max_step_tokens = 24;
  o.vocab = 20;
  o.in_flight = in_flight;
  return o;
}

TEST(CApi, GenerateManyRunsPromptsOfAnyLengthInFlight) {
  adafuse_engine* engine = adafuse::make_engine_handle(std::make_unique<HistoryBackendForTests>(many_options(true)));
  std::mt19937_64 rng(11);
  std::vector<std::vector<int64_t>> prompts;
  for (int i = 0; i < 10; ++i) {
    prompts.emplace_back(1 + rng() % 60);
    for (auto& t : prompts.back()) t = static_cast<int64_t>(rng() % 20);
  }
  std::vector<const int64_t*> pointers;
  std::vector<int32_t> lens;
  for (const auto& p : prompts) pointers.push_back(p.data()), lens.push_back(static_cast<int32_t>(p.size()));
  std::map<int32_t, std::vector<int64_t>> streamed;
  adafuse_generate_options o = adafuse_generate_options_default();
  o.max_new_tokens = 12;
  o.sampling = {0.8f, 0, 1.0f, 500};
  o.user = &streamed;
  o.on_token = [](void* user, int32_t s, int64_t t) {
    auto& m = *static_cast<std::map<int32_t, std::vector<int64_t>>*>(user);
    m[s].push_back(t);
    return s == 4 && m[s].size() == 2 ? 1 : 0;  // sequence 4 stops after two tokens
  };
  std::vector<int64_t> tokens(10 * 12, 99);
  std::vector<int32_t> lengths(10, -5);
  ASSERT_EQ(adafuse_generate_many(engine, pointers.data(), lens.data(), 10, &o, tokens.data(), lengths.data()), ADAFUSE_OK)
      << adafuse_last_error();
  for (int32_t i = 0; i < 10; ++i) {
    SequenceOptions seq;
    seq.max_new_tokens = 12;
    seq.sampling = {0.8f, 0, 1.0f, 500u + static_cast<uint64_t>(i)};
    auto solo = HistoryBackendForTests::solo_tokens(prompts[static_cast<size_t>(i)], seq, 20);
    if (i == 4) solo.resize(2);
    const std::vector<int64_t> row(tokens.begin() + i * 12, tokens.begin() + i * 12 + lengths[static_cast<size_t>(i)]);
    EXPECT_EQ(row, solo) << "sequence " << i;
    EXPECT_EQ(streamed[i], solo) << "sequence " << i;
    for (int32_t j = lengths[static_cast<size_t>(i)]; j < 12; ++j) EXPECT_EQ(tokens[static_cast<size_t>(i * 12 + j)], -1);
  }
  // Bad input is refused before anything runs, naming the prompt.
  const int32_t bad_len[2] = {3, 81};
  expect_status(adafuse_generate_many(engine, pointers.data(), bad_len, 2, &o, tokens.data(), lengths.data()),
                ADAFUSE_ERR_INVALID_ARGUMENT, "prompt_lens[1] = 81: expected 1 to the engine's max_seq 80");
  const int64_t out_of_vocab[2] = {1, 20};
  const int64_t* bad_ids[1] = {out_of_vocab};
  const int32_t two[1] = {2};
  expect_status(adafuse_generate_many(engine, bad_ids, two, 1, &o, tokens.data(), lengths.data()), ADAFUSE_ERR_INVALID_ARGUMENT,
                "prompts[0][1] = 20 is out of the vocabulary [0, 20)");
  adafuse_engine_free(engine);
}

TEST(CApi, GenerateManyOnAnEqualLengthEngine) {
  adafuse_engine* engine = adafuse::make_engine_handle(std::make_unique<HistoryBackendForTests>(many_options(false)));
  const int64_t a[3] = {1, 2, 3}, b[3] = {4, 5, 6}, c[2] = {7, 8};
  const int64_t* same[2] = {a, b};
  const int64_t* mixed[2] = {a, c};
  const int32_t same_lens[2] = {3, 3}, mixed_lens[2] = {3, 2};
  adafuse_generate_options o = adafuse_generate_options_default();
  o.max_new_tokens = 5;
  std::vector<int64_t> tokens(2 * 5);
  std::vector<int32_t> lengths(2);
  ASSERT_EQ(adafuse_generate_many(engine, same, same_lens, 2, &o, tokens.data(), lengths.data()), ADAFUSE_OK) << adafuse_last_error();
  SequenceOptions seq;
  seq.max_new_tokens = 5;
  EXPECT_EQ(std::vector<int64_t>(tokens.begin() + 5, tokens.end()), HistoryBackendForTests::solo_tokens({4, 5, 6}, seq, 20));
  expect_status(adafuse_generate_many(engine, mixed, mixed_lens, 2, &o, tokens.data(), lengths.data()), ADAFUSE_ERR_UNSUPPORTED,
                "prompt 1 has 2 tokens, prompt 0 has 3: history hash backend (tests only) runs equal-length batches only (no "
                "in-flight step)");
  adafuse_engine_free(engine);
}

}  // namespace
}  // namespace adafuse::testing
