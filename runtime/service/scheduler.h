// The service's request queue and batcher. Requests wait in a bounded queue; one worker thread
// takes the oldest request and up to max_batch - 1 more of the same prompt length (the engine has
// one past length per batch), prefills them together, then runs one decode step for all of them at a
// time until each has finished. A failed step fails the requests of that batch, not the service.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"
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
  SequenceOptions options;
  // Called from the worker for each token; false cancels the request (e.g. the client went away).
  std::function<bool(int64_t)> on_token;
  std::promise<GenerateResult> done;
};

class Scheduler {
 public:
  Scheduler(Backend& backend, size_t queue_capacity, Metrics& metrics);
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
  std::vector<std::shared_ptr<GenerateRequest>> next_batch();
  void decode(std::vector<std::shared_ptr<GenerateRequest>>& batch);

  Backend& backend_;
  size_t capacity_;
  Metrics& metrics_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<GenerateRequest>> queue_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace adafuse
