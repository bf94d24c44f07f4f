// The decode loop over a replayed recording: greedy tokens are each position's argmax, stop ids and
// budgets end sequences, a callback streams and cancels, batches decode together, limits are refused.
#include "generation.h"
#include "replay_backend_for_tests.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

// Recorded logits [1, 8, 6]: position p peaks at token (p * 2 + 1) % 6.
fs::path write_recording(const TempDir& dir) {
  std::vector<float> logits(8 * 6);
  for (size_t p = 0; p < 8; ++p)
    for (size_t t = 0; t < 6; ++t) logits[p * 6 + t] = (t == (p * 2 + 1) % 6) ? 3.0f : -0.1f * static_cast<float>(t);
  write_file(dir / "logits.safetensors", safetensors_bytes({{"logits", "F32", {1, 8, 6}, bytes_of(logits)}}));
  return dir / "logits.safetensors";
}

SequenceOptions greedy(int32_t max_new, std::vector<int64_t> stop = {}) {
  SequenceOptions o;
  o.max_new_tokens = max_new;
  o.stop_ids = std::move(stop);
  return o;
}

TEST(Generation, GreedyFollowsTheRecordedArgmax) {
  TempDir dir;
  ReplayBackendForTests backend(write_recording(dir), 2, 8);
  Generation gen(backend, {{0, 1, 2}}, {greedy(4)});
  std::vector<int64_t> streamed;
  while (gen.step([&](int32_t s, int64_t t) { EXPECT_EQ(s, 0); streamed.push_back(t); return true; })) {
  }
  // Prompt of 3: the first token comes from position 2, then positions 3, 4, 5.
  EXPECT_EQ(gen.tokens(0), (std::vector<int64_t>{5, 1, 3, 5}));
  EXPECT_EQ(streamed, gen.tokens(0));
  EXPECT_EQ(gen.finish(0), Finish::length);
  EXPECT_EQ(backend.past_length(), 6);  // the last token is never fed back
}

TEST(Generation, StopIdsAndCallbacksEndSequencesOfABatch) {
  TempDir dir;
  ReplayBackendForTests backend(write_recording(dir), 2, 8);
  Generation gen(backend, {{0, 1}, {4, 4}}, {greedy(5, {5}), greedy(5)});
  int calls = 0;
  while (gen.step([&](int32_t s, int64_t) { ++calls; return !(s == 1 && gen.tokens(1).size() == 2); })) {
  }
  EXPECT_EQ(gen.tokens(0), (std::vector<int64_t>{3, 5}));  // positions 1, 2; 5 is a stop id
  EXPECT_EQ(gen.finish(0), Finish::stop_token);
  EXPECT_EQ(gen.tokens(1), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(gen.finish(1), Finish::cancelled);
  EXPECT_EQ(calls, 4);
}

TEST(Generation, RefusesWhatTheEngineCannotRun) {
  TempDir dir;
  ReplayBackendForTests backend(write_recording(dir), 2, 8);
  expect_error([&] { Generation g(backend, {{1}, {2}, {3}}, {greedy(1), greedy(1), greedy(1)}); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "batch of 3 sequences: the engine's profile takes 1 to 2");
  expect_error([&] { Generation g(backend, {{1, 2}, {3}}, {greedy(1), greedy(1)}); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "prompt 1 has 1 tokens, prompt 0 has 2: one batch shares one length (the engine has no attention mask)");
  expect_error([&] { Generation g(backend, {{1, 2, 3}}, {greedy(7)}); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "prompt of 3 tokens + max_new_tokens 7 exceed the engine's profile (max_seq 8)");
  expect_error([&] { Generation g(backend, {{1}}, {greedy(0)}); }, ADAFUSE_ERR_INVALID_ARGUMENT, "max_new_tokens must be >= 1, found 0");
  expect_error([&] { Generation g(backend, {{1}}, {greedy(2, {6})}); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "stop id 6 is out of the vocabulary [0, 6)");
  Generation bad_id(backend, {{1, 9}}, {greedy(1)});
  expect_error([&] { bad_id.step({}); }, ADAFUSE_ERR_INVALID_ARGUMENT, "token id 9 at position 1 is out of the vocabulary [0, 6)");
  std::vector<float> logits(6);
  const int64_t one = 1;
  expect_error([&] { backend.decode(&one, 1, logits.data()); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "decode before prefill: no batch is running");
}

TEST(Generation, SampledSequencesOfABatchUseTheirOwnSeeds) {
  TempDir dir;
  ReplayBackendForTests backend(write_recording(dir), 2, 8);
  auto run = [&](uint64_t seed0, uint64_t seed1) {
    std::vector<SequenceOptions> o(2, greedy(5));
    o[0].sampling = {4.0f, 0, 1.0f, seed0};
    o[1].sampling = {4.0f, 0, 1.0f, seed1};
    Generation gen(backend, {{0}, {0}}, o);
    while (gen.step({})) {
    }
    return std::vector<std::vector<int64_t>>{gen.tokens(0), gen.tokens(1)};
  };
  const auto a = run(1, 2), b = run(1, 2);
  EXPECT_EQ(a, b);
  EXPECT_NE(a[0], a[1]);
}

TEST(Backend, RefusesWorkAfterAStickyDeviceError) {
  TempDir dir;
  ReplayBackendForTests backend(write_recording(dir), 2, 8);
  backend.fail_as_sticky_at_decode(2);
  EXPECT_EQ(backend.unusable_reason(), "");
  Generation first(backend, {{1}}, {greedy(4)});
  const std::string reason = "decode step: an illegal memory access was encountered (sticky error simulated by the replay backend)";
  expect_error([&] {
    while (first.step({})) {
    }
  }, ADAFUSE_ERR_CUDA, reason);
  EXPECT_EQ(backend.unusable_reason(), reason);
  // Nothing runs any more, whatever is asked: a new batch or a step of the old one.
  const std::string refusal = "the engine cannot run after an earlier device error (" + reason + "); restart the process";
  expect_error([&] { Generation g(backend, {{1}}, {greedy(1)}); g.step({}); }, ADAFUSE_ERR_CUDA, refusal);
  std::vector<float> logits(6);
  const int64_t one = 1;
  expect_error([&] { backend.prefill(&one, 1, 1, false, logits.data()); }, ADAFUSE_ERR_CUDA, refusal);
  EXPECT_EQ(backend.unusable_reason(), reason);  // the first cause is kept
}

}  // namespace
}  // namespace adafuse::testing
