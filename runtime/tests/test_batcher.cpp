// In-flight batching (src/batcher.h) over the history backend: whatever the mix of lengths, budgets,
// chunks and slots, each request gets exactly the tokens it gets alone; the wait policy's bound;
// cancellation, failures and slot reuse.
#include <map>
#include <random>

#include "batcher.h"
#include "history_backend_for_tests.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

struct Job {
  std::vector<int64_t> prompt;
  SequenceOptions options;
};

SequenceOptions budget(int32_t n) {
  SequenceOptions o;
  o.max_new_tokens = n;
  return o;
}

std::vector<int64_t> random_prompt(std::mt19937_64& rng, size_t len, int64_t vocab) {
  std::vector<int64_t> p(len);
  for (auto& t : p) t = static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab));
  return p;
}

// Runs jobs through the batcher, admitting in order whenever a slot is free; returns tokens by job.
std::vector<FinishedSequence> run_all(InFlightBatcher& batcher, const std::vector<Job>& jobs) {
  std::vector<FinishedSequence> out(jobs.size());
  std::map<uint64_t, size_t> job_of;
  size_t next = 0, done = 0;
  while (done < jobs.size()) {
    while (next < jobs.size() && batcher.free_slots() > 0) job_of[batcher.admit(jobs[next].prompt, jobs[next].options)] = next, ++next;
    for (auto& f : batcher.step()) out[job_of.at(f.id)] = std::move(f), ++done;
  }
  return out;
}

TEST(InFlightBatcher, ManyRequestsOfMixedLengthsGetTheirSoloTokens) {
  HistoryBackendOptions o;
  o.max_batch = 8;
  o.max_seq = 400;
  o.max_step_tokens = 96;  // most prompts take several chunks
  o.vocab = 48;
  HistoryBackendForTests backend(o);
  InFlightBatcher batcher(backend);
  std::mt19937_64 rng(21);
  std::vector<Job> jobs;
  for (int i = 0; i < 60; ++i) {
    const size_t len = i < 2 ? static_cast<size_t>(1 + 299 * i) : 1 + rng() % 300;  // 1 and 300 both present
    Job j{random_prompt(rng, len, o.vocab), budget(1 + static_cast<int32_t>(rng() % 40))};
    if (i % 3 == 1) j.options.sampling = {0.9f, 20, 0.95f, static_cast<uint64_t>(i)};
    if (i % 5 == 2) j.options.stop_ids = {static_cast<int64_t>(rng() % 48), static_cast<int64_t>(rng() % 48)};
    jobs.push_back(j);
  }
  const auto got = run_all(batcher, jobs);
  int stopped = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const auto solo = HistoryBackendForTests::solo_tokens(jobs[i].prompt, jobs[i].options, o.vocab);
    EXPECT_EQ(got[i].tokens, solo) << "request " << i << " (prompt of " << jobs[i].prompt.size() << ")";
    EXPECT_EQ(got[i].error, "");
    const bool ended_by_stop = solo.size() < static_cast<size_t>(jobs[i].options.max_new_tokens);
    EXPECT_EQ(got[i].finish, ended_by_stop ? Finish::stop_token : Finish::length) << i;
    stopped += ended_by_stop;
  }
  EXPECT_GT(stopped, 0);
  // The batching really mixed things: steps with decode rows beside prefill chunks, prompts cut in
  // chunks, full occupancy, no step over the budget.
  int mixed = 0, full = 0;
  for (const auto& s : backend.steps()) {
    EXPECT_LE(s.tokens, 96);
    bool decode = false, prefill = false;
    for (const auto& r : s.rows) (r.count == 1 && r.start > 0 ? decode : prefill) = true;
    mixed += decode && prefill;
    full += s.rows.size() == 8u;
  }
  EXPECT_GT(mixed, 20);
  EXPECT_GT(full, 20);
  EXPECT_EQ(batcher.running(), 0u);
  EXPECT_EQ(batcher.free_slots(), 8);
  for (int32_t s = 0; s < 8; ++s) EXPECT_EQ(backend.slot_length(s), 0) << "slot " << s << " not released";
}

TEST(InFlightBatcher, EqualLengthExecutorAgreesOnTheSameDefinition) {
  // The solo reference itself, checked against the other executor (Generation over prefill/decode).
  HistoryBackendOptions o;
  o.in_flight = false;
  o.vocab = 48;
  HistoryBackendForTests backend(o);
  std::mt19937_64 rng(5);
  for (int i = 0; i < 4; ++i) {
    const auto prompt = random_prompt(rng, 1 + rng() % 50, 48);
    SequenceOptions opt = budget(12);
    opt.sampling = {i % 2 ? 0.7f : 0.0f, 0, 1.0f, 99};
    Generation gen(backend, {prompt}, {opt});
    while (gen.step({})) {
    }
    EXPECT_EQ(gen.tokens(0), HistoryBackendForTests::solo_tokens(prompt, opt, 48));
  }
}

TEST(InFlightBatcher, ShortRequestBehindALongPromptGetsItsFirstTokenWithinTheBound) {
  HistoryBackendOptions o;
  o.max_batch = 8;
  o.max_seq = 8200;
  o.max_step_tokens = 512;
  o.vocab = 32;
  HistoryBackendForTests backend(o);
  InFlightBatcher batcher(backend);
  std::mt19937_64 rng(8000);
  const auto long_prompt = random_prompt(rng, 8000, 32), short_prompt = random_prompt(rng, 10, 32);
  const uint64_t long_id = batcher.admit(long_prompt, budget(4));
  batcher.step();  // the long prompt has begun: 512 of its 8000 tokens
  std::vector<int64_t> short_tokens;
  SequenceHooks hooks;
  hooks.on_token = [&](int64_t t) { short_tokens.push_back(t); return true; };
  const uint64_t short_id = batcher.admit(short_prompt, budget(3), hooks);
  // Bound of the policy: ceil(10 / floor(512 / 8)) = 1 step to the first token.
  EXPECT_EQ(batcher.prefill_bound_steps(10), 1);
  int64_t steps = 0;
  while (short_tokens.empty()) batcher.step(), ++steps;
  EXPECT_LE(steps, batcher.prefill_bound_steps(10));
  EXPECT_EQ(short_tokens.front(), HistoryBackendForTests::solo_tokens(short_prompt, budget(3), 32).front());
  // The short request finishes while the long prompt is still being prefilled (no first token yet).
  std::vector<FinishedSequence> ended;
  while (ended.empty()) ended = batcher.step();
  ASSERT_EQ(ended.size(), 1u);
  EXPECT_EQ(ended[0].id, short_id);
  EXPECT_EQ(ended[0].tokens, HistoryBackendForTests::solo_tokens(short_prompt, budget(3), 32));
  EXPECT_LT(backend.slot_length(0), 8000);
  // Then the long one, with its solo tokens; every step stayed within 512 tokens.
  while (ended.empty() || ended[0].id != long_id) ended = batcher.step();
  EXPECT_EQ(ended[0].tokens, HistoryBackendForTests::solo_tokens(long_prompt, budget(4), 32));
  for (const auto& s : backend.steps()) EXPECT_LE(s.tokens, 512);
}

TEST(InFlightBatcher, PrefillBoundHoldsWhenEverySlotIsBusy) {
  // Seven long prompts and the running decoders take every other slot: a 100-token prompt still gets
  // floor(256 / 8) = 32 tokens per step, its first token within ceil(100 / 32) = 4 steps.
  HistoryBackendOptions o;
  o.max_batch = 8;
  o.max_seq = 4096;
  o.max_step_tokens = 256;
  HistoryBackendForTests backend(o);
  InFlightBatcher batcher(backend);
  std::mt19937_64 rng(7);
  for (int i = 0; i < 7; ++i) batcher.admit(random_prompt(rng, i < 3 ? 3000 : 40, o.vocab), budget(200));
  for (int i = 0; i < 3; ++i) batcher.step();  // the short ones decode, the long ones prefill
  std::vector<int64_t> first;
  SequenceHooks hooks;
  hooks.on_token = [&](int64_t t) { first.push_back(t); return false; };  // one token is enough: cancel
  const auto prompt = random_prompt(rng, 100, o.vocab);
  batcher.admit(prompt, budget(50), hooks);
  EXPECT_EQ(batcher.prefill_bound_steps(100), 4);
  int64_t steps = 0;
  while (first.empty()) batcher.step(), ++steps;
  EXPECT_LE(steps, 4);
  EXPECT_EQ(first[0], HistoryBackendForTests::solo_tokens(prompt, budget(1), o.vocab)[0]);
}

TEST(InFlightBatcher, CancellationFreesTheSlotWithinOneStep) {
  HistoryBackendOptions o;
  o.max_batch = 2;
  o.max_step_tokens = 16;
  HistoryBackendForTests backend(o);
  InFlightBatcher batcher(backend);
  bool cancel_a = false;
  SequenceHooks hooks;
  hooks.cancelled = [&] { return cancel_a; };
  const std::vector<int64_t> pa = {1, 2, 3}, pb = {4, 5}, pc = {6, 7, 8, 9};
  const uint64_t a = batcher.admit(pa, budget(50), hooks);
  const uint64_t b = batcher.admit(pb, budget(50));
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(batcher.step().empty());
  EXPECT_EQ(batcher.free_slots(), 0);
  expect_error([&] { batcher.admit(pc, budget(2)); }, ADAFUSE_ERR_INVALID_ARGUMENT, "no free slot: all 2 hold running sequences");
  cancel_a = true;  // e.g. the client went away between steps
  const int64_t before = backend.step_count();
  auto ended = batcher.step();
  ASSERT_EQ(ended.size(), 1u);
  EXPECT_EQ(ended[0].id, a);
  EXPECT_EQ(ended[0].finish, Finish::cancelled);
  const auto solo_a = HistoryBackendForTests::solo_tokens(pa, budget(50), o.vocab);
  EXPECT_EQ(ended[0].tokens, std::vector<int64_t>(solo_a.begin(), solo_a.begin() + 5));
  // The step that ran after the cancellation carried b only, and slot 0 was released before it.
  const auto steps = backend.steps();
  ASSERT_EQ(static_cast<int64_t>(steps.size()), before + 1);
  ASSERT_EQ(steps.back().rows.size(), 1u);
  EXPECT_EQ(steps.back().rows[0].slot, 1);
  EXPECT_EQ(backend.slot_length(0), 0);
  // The slot is reused at once; the newcomer's tokens are its own (start 0 over the old cache).
  const uint64_t c = batcher.admit(pc, budget(6));
  std::vector<FinishedSequence> done;
  while (done.empty()) done = batcher.step();
  EXPECT_EQ(done[0].id, c);
  EXPECT_EQ(done[0].tokens, HistoryBackendForTests::solo_tokens(pc, budget(6), o.vocab));
  const auto reuse = backend.steps()[static_cast<size_t>(before + 1)].rows;  // b's decode row, then c's prompt
  ASSERT_EQ(reuse.size(), 2u);
  EXPECT_EQ(reuse[1].slot, 0);
  EXPECT_EQ(reuse[1].start, 0);
  EXPECT_EQ(reuse[1].count, 4);
  // cancel() by id ends b at once.
  EXPECT_TRUE(batcher.cancel(b));
  EXPECT_FALSE(batcher.cancel(a));
  ended = batcher.step();
  ASSERT_EQ(ended.size(), 1u);
  EXPECT_EQ(ended[0].finish, Finish::cancelled);
  EXPECT_EQ(batcher.running(), 0u);
  EXPECT_EQ(batcher.free_slots(), 2);
}

TEST(InFlightBatcher, SlotsAreReusedByManySequences) {
  HistoryBackendOptions o;
  o.max_batch = 2;
  o.max_step_tokens = 8;
  HistoryBackendForTests backend(o);
  InFlightBatcher batcher(backend);
  std::mt19937_64 rng(3);
  std::vector<Job> jobs;
  for (int i = 0; i < 12; ++i) jobs.push_back(Job{random_prompt(rng, 1 + rng() % 20, o.vocab), budget(1 + i % 5)});
  const auto got = run_all(batcher, jobs);
  for (size_t i = 0; i < jobs.size(); ++i)
    EXPECT_EQ(got[i].tokens, HistoryBackendForTests::solo_tokens(jobs[i].prompt, jobs[i].options, o.vocab)) << i;
  int fresh = 0;
  for (const auto& s : backend.steps())
    for (const auto& r : s.rows) {
      EXPECT_LT(r.slot, 2);
      fresh += r.start == 0;
    }
  EXPECT_EQ(fresh, 12);  // every sequence began at position 0 of a slot
}

TEST(InFlightBatcher, AFailedStepFailsItsSequencesOnly) {
  HistoryBackendOptions o;
  o.max_batch = 3;
  o.max_step_tokens = 12;
  HistoryBackendForTests backend(o);
  backend.fail_at_step(4);
  InFlightBatcher batcher(backend);
  const std::vector<int64_t> p1 = {1, 2}, p2 = {3, 4, 5}, p3 = {6};
  batcher.admit(p1, budget(10));
  batcher.admit(p2, budget(10));
  std::vector<FinishedSequence> failed;
  for (int i = 0; i < 4; ++i) {
    auto e = batcher.step();
    failed.insert(failed.end(), e.begin(), e.end());
  }
  ASSERT_EQ(failed.size(), 2u);
  for (const auto& f : failed) EXPECT_EQ(f.error, "history backend: step 4 failed (simulated)");
  EXPECT_EQ(batcher.free_slots(), 3);
  EXPECT_EQ(batcher.admit(p3, budget(3)), 3u);
  std::vector<FinishedSequence> done;
  while (done.empty()) done = batcher.step();
  EXPECT_EQ(done[0].error, "");
  EXPECT_EQ(done[0].tokens, HistoryBackendForTests::solo_tokens(p3, budget(3), o.vocab));
}

TEST(InFlightBatcher, RefusesWhatItCannotRun) {
  HistoryBackendOptions o;
  o.max_batch = 4;
  o.max_seq = 32;
  o.max_step_tokens = 64;
  HistoryBackendForTests backend(o);
  expect_error([&] { InFlightBatcher b(backend, 3); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "step_tokens 3: expected max_batch (4) to the backend's max_step_tokens (64)");
  expect_error([&] { InFlightBatcher b(backend, 65); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "step_tokens 65: expected max_batch (4) to the backend's max_step_tokens (64)");
  HistoryBackendOptions eq = o;
  eq.in_flight = false;
  HistoryBackendForTests equal_length(eq);
  expect_error([&] { InFlightBatcher b(equal_length); }, ADAFUSE_ERR_UNSUPPORTED,
               "history hash backend (tests only): in-flight batching needs a backend with step(); this one runs equal-length "
               "batches only");
  InFlightBatcher batcher(backend);
  expect_error([&] { batcher.admit({}, budget(1)); }, ADAFUSE_ERR_INVALID_ARGUMENT, "prompt is empty");
  expect_error([&] { batcher.admit({1, 32}, budget(1)); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "prompt id 32 at position 1 is out of the vocabulary [0, 32)");
  expect_error([&] { batcher.admit({1, 2, 3}, budget(31)); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "prompt of 3 tokens + max_new_tokens 31 exceed the engine's profile (max_seq 32)");
  EXPECT_EQ(batcher.running(), 0u);
  EXPECT_TRUE(batcher.step().empty());  // nothing to run: no backend step
  EXPECT_EQ(backend.step_count(), 0);
}

}  // namespace
}  // namespace adafuse::testing
