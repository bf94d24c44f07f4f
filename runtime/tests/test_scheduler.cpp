// The service's Scheduler over the history backend: one class, the executor picked by
// info().in_flight. Concurrent clients get their solo tokens, the queue bound holds, a cancel flag
// ends a request at the next step boundary, failures stay with their requests, metrics are recorded.
#include <future>
#include <random>
#include <thread>

#include "history_backend_for_tests.h"
#include "scheduler.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

std::shared_ptr<GenerateRequest> request(std::vector<int64_t> prompt, int32_t max_new) {
  auto r = std::make_shared<GenerateRequest>();
  r->prompt = std::move(prompt);
  r->options.max_new_tokens = max_new;
  return r;
}

std::vector<int64_t> random_prompt(std::mt19937_64& rng, size_t len, int64_t vocab) {
  std::vector<int64_t> p(len);
  for (auto& t : p) t = static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab));
  return p;
}

HistoryBackendOptions options(int32_t max_batch, int32_t max_step_tokens, std::chrono::microseconds delay = {}) {
  HistoryBackendOptions o;
  o.max_batch = max_batch;
  o.max_seq = 400;
  o.max_step_tokens = max_step_tokens;
  o.vocab = 40;
  o.step_delay = delay;
  return o;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

TEST(Scheduler, ConcurrentClientsGetTheirSoloTokensInFlight) {
  HistoryBackendForTests backend(options(8, 64, std::chrono::microseconds(100)));
  Metrics metrics;
  std::vector<std::shared_ptr<GenerateRequest>> requests;
  std::mt19937_64 rng(64);
  for (int i = 0; i < 64; ++i) {
    auto r = request(random_prompt(rng, i == 0 ? 300 : 1 + rng() % 300, 40), 1 + static_cast<int32_t>(rng() % 30));
    if (i % 4 == 3) r->options.sampling = {1.1f, 0, 0.9f, static_cast<uint64_t>(1000 + i)};
    requests.push_back(r);
  }
  std::vector<std::shared_future<GenerateResult>> results;
  for (auto& r : requests) results.push_back(r->done.get_future().share());
  {
    Scheduler scheduler(backend, 64, metrics);
    std::vector<std::thread> clients;
    for (int c = 0; c < 8; ++c)
      clients.emplace_back([&, c] {
        for (int i = c; i < 64; i += 8) {
          scheduler.check(*requests[static_cast<size_t>(i)]);
          EXPECT_TRUE(scheduler.submit(requests[static_cast<size_t>(i)]));
        }
      });
    for (auto& t : clients) t.join();
    for (size_t i = 0; i < requests.size(); ++i) {
      const GenerateResult& got = results[i].get();
      EXPECT_EQ(got.error, "");
      EXPECT_EQ(got.tokens, HistoryBackendForTests::solo_tokens(requests[i]->prompt, requests[i]->options, 40)) << i;
      EXPECT_EQ(got.finish_reason, "length");
    }
  }
  size_t most_rows = 0;
  for (const auto& s : backend.steps()) most_rows = std::max(most_rows, s.rows.size());
  EXPECT_EQ(most_rows, 8u);  // requests of different lengths shared steps
  const std::string text = metrics.prometheus();
  EXPECT_TRUE(contains(text, "adafuse_queue_wait_seconds_count 64\n")) << text;
  EXPECT_TRUE(contains(text, "adafuse_batch_rows_count " + std::to_string(backend.step_count()) + "\n")) << text;
  EXPECT_TRUE(contains(text, "adafuse_step_prefill_tokens_bucket{le=\"0\"} ")) << text;
}

// The worker calls on_token between steps: a callback that waits holds the executor at a step
// boundary, which makes these tests independent of timing.
struct Gate {
  std::promise<void> reached, open;
  std::shared_future<void> opened = open.get_future().share();
  std::atomic<bool> once{false};
  void pass_first_time() {
    if (once.exchange(true)) return;
    reached.set_value();
    opened.wait();
  }
};

TEST(Scheduler, QueueOverflowIsRefusedWhileTheSlotsAreBusy) {
  HistoryBackendForTests backend(options(1, 16));
  Metrics metrics;
  Scheduler scheduler(backend, 2, metrics);
  auto a = request({1, 2, 3}, 300);
  Gate gate;
  a->on_token = [&](int64_t) { gate.pass_first_time(); return true; };
  auto a_done = a->done.get_future();
  ASSERT_TRUE(scheduler.submit(a));
  gate.reached.get_future().wait();  // a holds the only slot
  auto b = request({4}, 5), c = request({5, 6}, 5), d = request({7}, 5);
  auto b_done = b->done.get_future(), c_done = c->done.get_future();
  EXPECT_TRUE(scheduler.submit(b));
  EXPECT_TRUE(scheduler.submit(c));
  EXPECT_FALSE(scheduler.submit(d));  // two waiting: the queue is full
  a->cancel = true;
  gate.open.set_value();
  const GenerateResult ra = a_done.get();
  EXPECT_EQ(ra.finish_reason, "cancelled");
  EXPECT_EQ(ra.tokens.size(), 1u);
  EXPECT_EQ(b_done.get().tokens, HistoryBackendForTests::solo_tokens({4}, b->options, 40));
  EXPECT_EQ(c_done.get().tokens, HistoryBackendForTests::solo_tokens({5, 6}, c->options, 40));
}

TEST(Scheduler, CancelFlagEndsTheRequestAtTheNextStepBoundary) {
  HistoryBackendForTests backend(options(2, 16));
  Metrics metrics;
  Scheduler scheduler(backend, 8, metrics);
  auto longer = request({9, 9}, 300);
  Gate gate;
  longer->on_token = [&](int64_t) { gate.pass_first_time(); return true; };
  auto longer_done = longer->done.get_future();
  ASSERT_TRUE(scheduler.submit(longer));
  gate.reached.get_future().wait();
  auto r = request({1, 2, 3}, 100);
  int tokens = 0;
  int64_t cancelled_after = -1;  // steps run when the flag was set
  r->on_token = [&](int64_t) {
    if (++tokens == 3) {  // the third token: the client goes away
      cancelled_after = backend.step_count();
      r->cancel = true;
    }
    return true;
  };
  auto done = r->done.get_future();
  ASSERT_TRUE(scheduler.submit(r));
  gate.open.set_value();  // r joins the running batch at the next step boundary
  const GenerateResult got = done.get();
  EXPECT_EQ(got.finish_reason, "cancelled");
  const auto solo = HistoryBackendForTests::solo_tokens({1, 2, 3}, r->options, 40);
  EXPECT_EQ(got.tokens, std::vector<int64_t>(solo.begin(), solo.begin() + 3));
  EXPECT_EQ(longer_done.get().tokens, HistoryBackendForTests::solo_tokens({9, 9}, longer->options, 40));
  // No step after the one that produced the third token carried the cancelled request's slot.
  const auto steps = backend.steps();
  ASSERT_GT(static_cast<int64_t>(steps.size()), cancelled_after + 10);  // the longer request went on
  const int32_t slot = steps[static_cast<size_t>(cancelled_after - 1)].rows.back().slot;
  EXPECT_NE(slot, steps[0].rows[0].slot);
  for (size_t s = static_cast<size_t>(cancelled_after); s < steps.size(); ++s)
    for (const auto& row : steps[s].rows) EXPECT_NE(row.slot, slot) << "step " << s;
  EXPECT_EQ(backend.slot_length(slot), 0);
  // Cancelled while waiting: answered without running.
  auto waiting = request({4}, 3);
  waiting->cancel = true;
  auto waiting_done = waiting->done.get_future();
  const int64_t before = backend.step_count();
  ASSERT_TRUE(scheduler.submit(waiting));
  const GenerateResult w = waiting_done.get();
  EXPECT_EQ(w.finish_reason, "cancelled");
  EXPECT_TRUE(w.tokens.empty());
  EXPECT_EQ(backend.step_count(), before);
}

TEST(Scheduler, AFailedStepFailsItsRequestsNotTheService) {
  HistoryBackendForTests backend(options(4, 16));
  backend.fail_at_step(3);
  Metrics metrics;
  Scheduler scheduler(backend, 8, metrics);
  auto a = request({1, 2}, 10);
  auto a_done = a->done.get_future();
  ASSERT_TRUE(scheduler.submit(a));
  EXPECT_EQ(a_done.get().error, "history backend: step 3 failed (simulated)");
  auto b = request({3}, 4);
  auto b_done = b->done.get_future();
  ASSERT_TRUE(scheduler.submit(b));
  const GenerateResult rb = b_done.get();
  EXPECT_EQ(rb.error, "");
  EXPECT_EQ(rb.tokens, HistoryBackendForTests::solo_tokens({3}, b->options, 40));
}

TEST(Scheduler, StoppingAnswersRunningAndWaitingRequests) {
  HistoryBackendForTests backend(options(1, 16, std::chrono::microseconds(2000)));
  Metrics metrics;
  auto a = request({1}, 300), b = request({2}, 3);
  auto a_done = a->done.get_future(), b_done = b->done.get_future();
  Gate gate;
  a->on_token = [&](int64_t) { gate.pass_first_time(); return true; };
  {
    Scheduler scheduler(backend, 4, metrics);
    ASSERT_TRUE(scheduler.submit(a));
    gate.reached.get_future().wait();
    ASSERT_TRUE(scheduler.submit(b));
    gate.open.set_value();  // a has 299 steps of 2 ms to go when the scheduler stops
  }
  EXPECT_EQ(a_done.get().error, "the service stopped before the request finished");
  EXPECT_EQ(b_done.get().error, "the service stopped before the request finished");
}

TEST(Scheduler, EqualLengthBackendsKeepTheEqualLengthPath) {
  HistoryBackendOptions o = options(4, 0);
  o.in_flight = false;
  HistoryBackendForTests backend(o);
  Metrics metrics;
  std::vector<std::shared_ptr<GenerateRequest>> requests;
  std::vector<std::future<GenerateResult>> results;
  {
    Scheduler scheduler(backend, 16, metrics);
    std::mt19937_64 rng(4);
    for (size_t len : {5, 5, 7, 5, 7, 9}) {
      requests.push_back(request(random_prompt(rng, len, 40), 6));
      results.push_back(requests.back()->done.get_future());
      ASSERT_TRUE(scheduler.submit(requests.back()));
    }
    for (size_t i = 0; i < requests.size(); ++i)
      EXPECT_EQ(results[i].get().tokens, HistoryBackendForTests::solo_tokens(requests[i]->prompt, requests[i]->options, 40)) << i;
  }
  EXPECT_EQ(backend.step_count(), 0);  // never the in-flight step
  EXPECT_TRUE(contains(metrics.prometheus(), "adafuse_queue_wait_seconds_count 6\n"));
}

}  // namespace
}  // namespace adafuse::testing
