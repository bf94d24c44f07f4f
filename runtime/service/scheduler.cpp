#include "scheduler.h"

#include <chrono>
#include <map>

#include "error.h"
#include "sampling.h"

namespace adafuse {
namespace {

std::unique_ptr<InFlightBatcher> make_batcher(Backend& backend, int32_t step_tokens) {
  if (!backend.info().in_flight) return nullptr;
  return std::make_unique<InFlightBatcher>(backend, step_tokens);
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

void Scheduler::answer(GenerateRequest& request, GenerateResult result) {
  const bool cancelled = result.error.empty() && result.finish_reason == finish_name(Finish::cancelled);
  try {
    request.done.set_value(std::move(result));
  } catch (const std::future_error&) {  // already answered
    return;
  }
  if (cancelled) metrics_.cancelled();
}

bool Scheduler::deliver(GenerateRequest& request, int64_t token) {
  const auto now = std::chrono::steady_clock::now();
  if (request.any_token)
    metrics_.inter_token(std::chrono::duration<double>(now - request.last_token).count());
  else
    metrics_.first_token(std::chrono::duration<double>(now - request.submitted).count());
  request.any_token = true;
  request.last_token = now;
  return !request.on_token || request.on_token(token);
}

Scheduler::Scheduler(Backend& backend, size_t queue_capacity, Metrics& metrics, int32_t step_tokens)
    : backend_(backend),
      capacity_(queue_capacity),
      metrics_(metrics),
      step_tokens_(step_tokens),
      batcher_(make_batcher(backend, step_tokens)),
      worker_([this] { run(); }) {}

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
  if (request.prompt.empty()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, request.prompt_field + " is empty");
  if (request.prompt.size() > static_cast<size_t>(info.max_seq))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt of " + std::to_string(request.prompt.size()) +
                                           " tokens is longer than the engine's profile (max_seq " + std::to_string(info.max_seq) + ")");
  for (size_t i = 0; i < request.prompt.size(); ++i)
    if (request.prompt[i] < 0 || request.prompt[i] >= info.vocab)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, request.prompt_field + "[" + std::to_string(i) + "] = " + std::to_string(request.prompt[i]) +
                                             " is out of the vocabulary [0, " + std::to_string(info.vocab) + ")");
  // check_sequence's own message names max_new_tokens; this one names the field the body used
  // (after the sampling options, which check_sequence checks first).
  check_sampling(request.options.sampling);
  if (request.options.max_new_tokens >= 1 && request.prompt.size() + static_cast<size_t>(request.options.max_new_tokens) - 1 >
                                                 static_cast<size_t>(info.max_seq))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt of " + std::to_string(request.prompt.size()) + " tokens + " + request.budget_field + " " +
                                           std::to_string(request.options.max_new_tokens) + " exceed the engine's profile (max_seq " +
                                           std::to_string(info.max_seq) + ")");
  check_sequence(info, request.prompt.size(), request.options);
}

bool Scheduler::submit(std::shared_ptr<GenerateRequest> request) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (queue_.size() >= capacity_) return false;
    request->submitted = std::chrono::steady_clock::now();
    queue_.push_back(std::move(request));
    metrics_.queue_depth(static_cast<int64_t>(queue_.size()));
  }
  ready_.notify_one();
  return true;
}

void Scheduler::run() {
  if (batcher_)
    run_in_flight();
  else
    run_equal_length();
}

// ---- equal-length batches (backends without a length per row)

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
    metrics_.batching().queue_wait(seconds_since(r->submitted));
  }
  Generation gen(backend_, std::move(prompts), std::move(options));
  metrics_.active_sequences(static_cast<int64_t>(batch.size()));
  bool first = true, more = true;
  while (more) {
    for (size_t i = 0; i < batch.size(); ++i)
      if (batch[i]->cancel.load()) gen.cancel(i);
    if (gen.done()) break;
    const auto start = std::chrono::steady_clock::now();
    int64_t emitted = 0;
    more = gen.step([&](int32_t s, int64_t token) {
      ++emitted;
      return deliver(*batch[static_cast<size_t>(s)], token);
    });
    metrics_.step(first, seconds_since(start));
    // Finished sequences ride along in the fixed batch shape: every row is occupied.
    metrics_.batching().step(static_cast<int64_t>(batch.size()),
                             first ? static_cast<int64_t>(batch.size() * batch[0]->prompt.size()) : 0);
    metrics_.tokens(emitted);
    first = false;
  }
  for (size_t i = 0; i < batch.size(); ++i) answer(*batch[i], GenerateResult{gen.tokens(i), finish_name(gen.finish(i)), ""});
}

void Scheduler::run_equal_length() {
  for (;;) {
    auto batch = next_batch();
    if (batch.empty()) return;  // stopping
    try {
      decode(batch);
    } catch (const std::exception& e) {
      // Requests were checked before queueing: this is the engine failing. Fail this batch only.
      for (auto& r : batch) answer(*r, GenerateResult{{}, "", e.what()});
    }
    metrics_.active_sequences(0);
  }
}

// ---- in-flight batching (backends with step())

void Scheduler::run_in_flight() {
  InFlightBatcher& batcher = *batcher_;
  std::map<uint64_t, std::shared_ptr<GenerateRequest>> running;
  auto finish = [&](std::vector<FinishedSequence> ended) {
    for (auto& f : ended) {
      auto it = running.find(f.id);
      if (it == running.end()) continue;
      answer(*it->second, GenerateResult{std::move(f.tokens), f.error.empty() ? finish_name(f.finish) : "", f.error});
      running.erase(it);
    }
  };
  for (;;) {
    finish(batcher.drop_cancelled());  // slots of cancelled requests are free for this step's newcomers
    {
      std::unique_lock<std::mutex> lock(mutex_);
      ready_.wait(lock, [&] { return stopping_ || !queue_.empty() || batcher.running() > 0; });
      if (stopping_) break;
      // Step boundary: waiting requests take the free slots, oldest first.
      while (!queue_.empty() && batcher.free_slots() > 0) {
        std::shared_ptr<GenerateRequest> r = std::move(queue_.front());
        queue_.pop_front();
        if (r->cancel.load()) {
          answer(*r, GenerateResult{{}, finish_name(Finish::cancelled), ""});
          continue;
        }
        metrics_.batching().queue_wait(seconds_since(r->submitted));
        SequenceHooks hooks;
        hooks.on_token = [this, request = r.get()](int64_t token) { return deliver(*request, token); };
        hooks.cancelled = [request = r.get()] { return request->cancel.load(); };
        try {
          running.emplace(batcher.admit(r->prompt, r->options, std::move(hooks)), r);
        } catch (const std::exception& e) {  // checked at submit; a refusal here is the engine's limits
          answer(*r, GenerateResult{{}, "", e.what()});
        }
      }
      metrics_.queue_depth(static_cast<int64_t>(queue_.size()));
    }
    if (batcher.running() == 0) continue;
    metrics_.active_sequences(static_cast<int64_t>(batcher.running()));
    auto ended = batcher.step();
    const BatchStepStats& stats = batcher.last_step();
    if (stats.rows > 0) {
      metrics_.step(stats.prefill_tokens > 0, stats.seconds);
      metrics_.batching().step(stats.rows, stats.prefill_tokens);
      metrics_.tokens(stats.new_tokens);
    }
    finish(std::move(ended));
    metrics_.active_sequences(static_cast<int64_t>(batcher.running()));
  }
  // Stopping: what is still running or waiting ends now, answered rather than abandoned.
  const std::string reason = "the service stopped before the request finished";
  for (auto& [id, r] : running) answer(*r, GenerateResult{{}, "", reason});
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& r : queue_) answer(*r, GenerateResult{{}, "", reason});
  queue_.clear();
}

}  // namespace adafuse
