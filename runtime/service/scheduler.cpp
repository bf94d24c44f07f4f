#include "scheduler.h"

#include <chrono>

#include "error.h"

namespace adafuse {

Scheduler::Scheduler(Backend& backend, size_t queue_capacity, Metrics& metrics)
    : backend_(backend), capacity_(queue_capacity), metrics_(metrics), worker_([this] { run(); }) {}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  ready_.notify_all();
  worker_.join();
}

void Scheduler::check(const GenerateRequest& request) const {
  const BackendInfo& info = backend_.info();
  if (request.prompt.empty()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt_ids is empty");
  if (request.prompt.size() > static_cast<size_t>(info.max_seq))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt of " + std::to_string(request.prompt.size()) +
                                           " tokens is longer than the engine's profile (max_seq " + std::to_string(info.max_seq) + ")");
  for (size_t i = 0; i < request.prompt.size(); ++i)
    if (request.prompt[i] < 0 || request.prompt[i] >= info.vocab)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt_ids[" + std::to_string(i) + "] = " + std::to_string(request.prompt[i]) +
                                             " is out of the vocabulary [0, " + std::to_string(info.vocab) + ")");
  check_sequence(info, request.prompt.size(), request.options);
}

bool Scheduler::submit(std::shared_ptr<GenerateRequest> request) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (queue_.size() >= capacity_) return false;
    queue_.push_back(std::move(request));
    metrics_.queue_depth(static_cast<int64_t>(queue_.size()));
  }
  ready_.notify_one();
  return true;
}

std::vector<std::shared_ptr<GenerateRequest>> Scheduler::next_batch() {
  std::unique_lock<std::mutex> lock(mutex_);
  ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
  std::vector<std::shared_ptr<GenerateRequest>> batch;
  if (stopping_) return batch;
  const size_t length = queue_.front()->prompt.size();
  for (auto it = queue_.begin(); it != queue_.end() && batch.size() < static_cast<size_t>(backend_.info().max_batch);) {
    if ((*it)->prompt.size() == length) {
      batch.push_back(std::move(*it));
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  metrics_.queue_depth(static_cast<int64_t>(queue_.size()));
  return batch;
}

void Scheduler::decode(std::vector<std::shared_ptr<GenerateRequest>>& batch) {
  std::vector<std::vector<int64_t>> prompts;
  std::vector<SequenceOptions> options;
  for (const auto& r : batch) {
    prompts.push_back(r->prompt);
    options.push_back(r->options);
  }
  Generation gen(backend_, std::move(prompts), std::move(options));
  metrics_.active_sequences(static_cast<int64_t>(batch.size()));
  bool first = true, more = true;
  while (more) {
    const auto start = std::chrono::steady_clock::now();
    int64_t emitted = 0;
    more = gen.step([&](int32_t s, int64_t token) {
      ++emitted;
      const auto& on_token = batch[static_cast<size_t>(s)]->on_token;
      return !on_token || on_token(token);
    });
    metrics_.step(first, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    metrics_.tokens(emitted);
    first = false;
  }
  for (size_t i = 0; i < batch.size(); ++i)
    batch[i]->done.set_value(GenerateResult{gen.tokens(i), finish_name(gen.finish(i)), ""});
}

void Scheduler::run() {
  for (;;) {
    auto batch = next_batch();
    if (batch.empty()) return;  // stopping
    try {
      decode(batch);
    } catch (const std::exception& e) {
      // Requests were checked before queueing: this is the engine failing. Fail this batch only.
      for (auto& r : batch) {
        try {
          r->done.set_value(GenerateResult{{}, "", e.what()});
        } catch (const std::future_error&) {  // already answered
        }
      }
    }
    metrics_.active_sequences(0);
  }
}

}  // namespace adafuse
