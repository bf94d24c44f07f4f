// The test backend of in-flight batching: its logits are a function of the slot's whole history and
// of nothing else (position by position, in chunks or at once, in any slot, after a rewind).
#include "history_backend_for_tests.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

HistoryBackendOptions small(int32_t max_batch = 4, int32_t max_seq = 64, int32_t max_step_tokens = 64) {
  HistoryBackendOptions o;
  o.max_batch = max_batch;
  o.max_seq = max_seq;
  o.max_step_tokens = max_step_tokens;
  o.vocab = 16;
  return o;
}

std::vector<float> step_all(HistoryBackendForTests& b, int32_t slot, int32_t start, const std::vector<int64_t>& ids) {
  std::vector<float> logits(ids.size() * 16, std::nanf(""));
  const StepRow row{slot, start, static_cast<int32_t>(ids.size()), true};
  b.step(ids.data(), &row, 1, logits.data());
  return logits;
}

std::vector<float> expected_all(const std::vector<int64_t>& history, size_t from) {
  std::vector<float> out;
  for (size_t p = from; p < history.size(); ++p) {
    const auto l = HistoryBackendForTests::logits_after({history.begin(), history.begin() + static_cast<std::ptrdiff_t>(p) + 1}, 16);
    out.insert(out.end(), l.begin(), l.end());
  }
  return out;
}

TEST(HistoryBackend, LogitsFollowTheWholeHistoryOfTheSlot) {
  HistoryBackendForTests b(small());
  const std::vector<int64_t> h = {3, 1, 4, 1, 5, 9, 2, 6};
  EXPECT_EQ(step_all(b, 2, 0, h), expected_all(h, 0));
  EXPECT_EQ(b.slot_length(2), 8);
  EXPECT_EQ(b.history(2), h);
  // Every position differs from the others and from the same token after another history.
  const auto a = HistoryBackendForTests::logits_after({3, 1, 4}, 16), c = HistoryBackendForTests::logits_after({2, 1, 4}, 16);
  EXPECT_NE(a, c);  // a change at position 0 reaches position 2
  EXPECT_NE(HistoryBackendForTests::logits_after({4}, 16), a);  // the token alone does not decide
  for (float v : a) EXPECT_TRUE(v >= -4.0f && v < 4.0f) << v;
}

TEST(HistoryBackend, ChunksSlotsAndRowsDoNotChangeTheLogits) {
  HistoryBackendForTests one(small()), chunked(small());
  const std::vector<int64_t> h = {7, 7, 0, 15, 2, 8, 8, 1, 3};
  const auto whole = step_all(one, 0, 0, h);
  // Chunks of 4, 1 and 4 tokens in slot 3, two rows per step beside another sequence in slot 1.
  std::vector<float> got;
  const std::vector<int64_t> other = {5, 5, 5, 5, 5, 5, 5, 5, 5};
  int32_t at = 0;
  for (int32_t n : {4, 1, 4}) {
    std::vector<int64_t> ids(other.begin() + at, other.begin() + at + n);
    ids.insert(ids.end(), h.begin() + at, h.begin() + at + n);
    const StepRow rows[2] = {{1, at, n, false}, {3, at, n, true}};
    std::vector<float> logits(static_cast<size_t>(1 + n) * 16, std::nanf(""));
    chunked.step(ids.data(), rows, 2, logits.data());
    EXPECT_EQ(std::vector<float>(logits.begin(), logits.begin() + 16),
              HistoryBackendForTests::logits_after({other.begin(), other.begin() + at + n}, 16));
    got.insert(got.end(), logits.begin() + 16, logits.end());
    at += n;
  }
  EXPECT_EQ(got, whole);
  EXPECT_EQ(chunked.steps().size(), 3u);
  EXPECT_EQ(chunked.steps()[1].tokens, 2);
}

TEST(HistoryBackend, RewindAndReleaseStartOver) {
  HistoryBackendForTests b(small());
  std::vector<int64_t> h = {1, 2, 3, 4, 5, 6};
  step_all(b, 0, 0, h);
  // Rewind to 3 tokens and continue differently: the logits are those of the new history.
  const std::vector<int64_t> tail = {9, 9};
  const auto logits = step_all(b, 0, 3, tail);
  const std::vector<int64_t> rewound = {1, 2, 3, 9, 9};
  EXPECT_EQ(logits, expected_all(rewound, 3));
  EXPECT_EQ(b.slot_length(0), 5);
  EXPECT_EQ(b.history(0), rewound);
  // A start beyond what the slot holds is refused, and nothing moves.
  expect_error([&] { step_all(b, 0, 6, {1}); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "step row 0 (slot 0): start 6 is outside [0, 5] (the tokens the slot holds)");
  b.release(0);
  EXPECT_EQ(b.slot_length(0), 0);
  expect_error([&] { step_all(b, 0, 1, {1}); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "step row 0 (slot 0): start 1 is outside [0, 0] (the tokens the slot holds)");
  EXPECT_EQ(step_all(b, 0, 0, {6, 5}), expected_all({6, 5}, 0));
}

TEST(HistoryBackend, EqualLengthPathMatchesTheSteps) {
  HistoryBackendOptions o = small();
  o.in_flight = false;
  HistoryBackendForTests b(o);
  EXPECT_EQ(b.info().max_step_tokens, 0);
  const std::vector<int64_t> ids = {1, 2, 3, 4, 5, 6};  // two rows of 3
  std::vector<float> logits(2 * 16);
  b.prefill(ids.data(), 2, 3, false, logits.data());
  EXPECT_EQ(std::vector<float>(logits.begin(), logits.begin() + 16), HistoryBackendForTests::logits_after({1, 2, 3}, 16));
  EXPECT_EQ(std::vector<float>(logits.begin() + 16, logits.end()), HistoryBackendForTests::logits_after({4, 5, 6}, 16));
  const int64_t next[2] = {7, 8};
  b.decode(next, 2, logits.data());
  EXPECT_EQ(std::vector<float>(logits.begin() + 16, logits.end()), HistoryBackendForTests::logits_after({4, 5, 6, 8}, 16));
  expect_error([&] { step_all(b, 0, 0, {1}); }, ADAFUSE_ERR_UNSUPPORTED,
               "history hash backend (tests only): this backend runs equal-length batches only (no in-flight step)");
}

TEST(HistoryBackend, SoloReferenceIsTheHistoryFunction) {
  SequenceOptions o;
  o.max_new_tokens = 5;
  const std::vector<int64_t> prompt = {2, 7};
  const auto tokens = HistoryBackendForTests::solo_tokens(prompt, o, 16);
  ASSERT_EQ(tokens.size(), 5u);
  std::vector<int64_t> history = prompt;
  for (int64_t t : tokens) {  // each is the first argmax of the logits after the history so far
    const auto l = HistoryBackendForTests::logits_after(history, 16);
    EXPECT_EQ(t, std::max_element(l.begin(), l.end()) - l.begin());
    history.push_back(t);
  }
  o.stop_ids = {tokens[2]};  // ends at its first occurrence, which is kept
  const auto first = std::find(tokens.begin(), tokens.end(), tokens[2]);
  EXPECT_EQ(HistoryBackendForTests::solo_tokens(prompt, o, 16), std::vector<int64_t>(tokens.begin(), first + 1));
}

}  // namespace
}  // namespace adafuse::testing
