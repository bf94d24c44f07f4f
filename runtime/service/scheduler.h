// The service's request queue and executor. Requests wait in a bounded queue; one worker thread runs
// them with the executor the backend allows (info().in_flight):
// - in-flight (native backend, TensorRT engines): requests take free cache slots at step boundaries in arrival order
//   and share every step with the running sequences (src/batcher.h: chunked prefill, the wait policy);
//   a slot frees the moment its request ends or is cancelled.
// - equal-length (a backend without a length per row): the oldest request and up to max_batch - 1
//   more of the same prompt length are prefilled together, then decoded one step at a time until
//   each has finished; then the next batch.
// A failed step fails the requests in it, not the service.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"
#include "batcher.h"
#include "generation.h"
#include "metrics.h"

namespace adafuse {

struct GenerateResult {
  std::vector<int64_t> tokens;
  std::string finish_reason;  // stop, length, cancelled
  std::string error;          // non-empty when the engine failed
};

struct GenerateRequest {
  std::vector<int64_t> prompt;
  // What the body called the prompt and the token budget (for messages).
  std::string prompt_field = "prompt_ids", budget_field = "max_new_tokens";
  SequenceOptions options;
  // Called from the worker for each token; false cancels the request (e.g. the client went away).
  std::function<bool(int64_t)> on_token;
  // Set from any thread (e.g. the HTTP front when the client goes away): the request ends as
  // cancelled at the next step boundary, and its slot is freed there.
  std::atomic<bool> cancel{false};
  std::promise<GenerateResult> done;
  std::chrono::steady_clock::time_point submitted;  // set by Scheduler::submit (queue wait, TTFT)
  std::chrono::steady_clock::time_point last_token;  // set by the worker (inter-token latency)
  bool any_token = false;
};

class Scheduler {
 public:
  // step_tokens: the in-flight executor's tokens per step (0: the backend's max_step_tokens).
  Scheduler(Backend& backend, size_t queue_capacity, Metrics& metrics, int32_t step_tokens = 0);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Checks the request against the engine (throws adafuse::Error with the reason).
  void check(const GenerateRequest& request) const;
  // Queues a checked request; false when the queue is full.
  bool submit(std::shared_ptr<GenerateRequest> request);
  const BackendInfo& info() const { return backend_.info(); }
  // Non-empty once the backend can run nothing more (a sticky device error): the service is not ready.
  std::string unusable_reason() const { return backend_.unusable_reason(); }

 private:
  void run();
  // The equal-length executor.
  void run_equal_length();
  std::vector<std::shared_ptr<GenerateRequest>> next_batch();
  void decode(std::vector<std::shared_ptr<GenerateRequest>>& batch);
  // The in-flight executor.
  void run_in_flight();
  // A new token of `request`: its latencies recorded, then its on_token (false: cancel it).
  bool deliver(GenerateRequest& request, int64_t token);
  // Answers `request` (once; a second answer is ignored), counting a cancelled one.
  void answer(GenerateRequest& request, GenerateResult result);

  Backend& backend_;
  size_t capacity_;
  Metrics& metrics_;
  int32_t step_tokens_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<GenerateRequest>> queue_;
  bool stopping_ = false;
  std::unique_ptr<InFlightBatcher> batcher_;  // in-flight backends only; made before the worker starts
  std::thread worker_;
};

}  // namespace adafuse
