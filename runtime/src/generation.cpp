#include "generation.h"

#include <algorithm>

#include "error.h"

namespace adafuse {

const char* finish_name(Finish finish) {
  switch (finish) {
    case Finish::running: return "running";
    case Finish::stop_token: return "stop";
    case Finish::length: return "length";
    case Finish::cancelled: return "cancelled";
  }
  return "unknown";
}

void check_sequence(const BackendInfo& info, size_t prompt_len, const SequenceOptions& o) {
  check_sampling(o.sampling);
  if (o.max_new_tokens < 1) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "max_new_tokens must be >= 1, found " + std::to_string(o.max_new_tokens));
  // The last new token is never fed back: prompt + new - 1 positions go through the engine.
  if (prompt_len + static_cast<size_t>(o.max_new_tokens) - 1 > static_cast<size_t>(info.max_seq))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt of " + std::to_string(prompt_len) + " tokens + max_new_tokens " +
                                           std::to_string(o.max_new_tokens) + " exceed the engine's profile (max_seq " +
                                           std::to_string(info.max_seq) + ")");
  for (int64_t s : o.stop_ids)
    if (s < 0 || s >= info.vocab)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, "stop id " + std::to_string(s) + " is out of the vocabulary [0, " +
                                             std::to_string(info.vocab) + ")");
}

Generation::Generation(Backend& backend, std::vector<std::vector<int64_t>> prompts, std::vector<SequenceOptions> options)
    : backend_(backend), prompts_(std::move(prompts)), options_(std::move(options)) {
  const BackendInfo& info = backend.info();
  if (prompts_.empty()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "generation needs at least one prompt");
  if (options_.size() != prompts_.size()) fail(ADAFUSE_ERR_INTERNAL, "one SequenceOptions per prompt expected");
  if (prompts_.size() > static_cast<size_t>(info.max_batch))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "batch of " + std::to_string(prompts_.size()) + " sequences: the engine's profile takes 1 to " +
                                           std::to_string(info.max_batch));
  for (size_t i = 0; i < prompts_.size(); ++i) {
    if (prompts_[i].size() != prompts_[0].size())
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt " + std::to_string(i) + " has " + std::to_string(prompts_[i].size()) +
                                             " tokens, prompt 0 has " + std::to_string(prompts_[0].size()) +
                                             ": one batch shares one length (the engine has no attention mask)");
    if (prompts_[i].empty()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt " + std::to_string(i) + " is empty");
    check_sequence(info, prompts_[i].size(), options_[i]);
    samplers_.emplace_back(options_[i].sampling);
  }
  tokens_.resize(prompts_.size());
  finish_.assign(prompts_.size(), Finish::running);
}

bool Generation::done() const {
  return std::none_of(finish_.begin(), finish_.end(), [](Finish f) { return f == Finish::running; });
}

void Generation::cancel(size_t sequence) {
  if (finish_.at(sequence) == Finish::running) finish_[sequence] = Finish::cancelled;
}

void Generation::emit(const TokenCallback& on_token) {
  const int64_t vocab = backend_.info().vocab;
  for (size_t i = 0; i < prompts_.size(); ++i) {
    if (finish_[i] != Finish::running) continue;
    const int64_t token = samplers_[i].next(logits_.data() + i * static_cast<size_t>(vocab), vocab);
    tokens_[i].push_back(token);
    const auto& stop = options_[i].stop_ids;
    if (std::find(stop.begin(), stop.end(), token) != stop.end())
      finish_[i] = Finish::stop_token;
    else if (tokens_[i].size() >= static_cast<size_t>(options_[i].max_new_tokens))
      finish_[i] = Finish::length;
    if (on_token && !on_token(static_cast<int32_t>(i), token) && finish_[i] == Finish::running)
      finish_[i] = Finish::cancelled;
  }
}

bool Generation::step(const TokenCallback& on_token) {
  if (done()) return false;
  const int32_t batch = static_cast<int32_t>(prompts_.size());
  logits_.resize(static_cast<size_t>(batch) * static_cast<size_t>(backend_.info().vocab));
  if (!started_) {
    const int32_t len = static_cast<int32_t>(prompts_[0].size());
    std::vector<int64_t> ids;
    for (const auto& p : prompts_) ids.insert(ids.end(), p.begin(), p.end());
    backend_.prefill(ids.data(), batch, len, false, logits_.data());
    started_ = true;
  } else {
    // Finished sequences still ride along (the batch shape is fixed); their outputs are ignored.
    std::vector<int64_t> ids(static_cast<size_t>(batch));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = tokens_[i].empty() ? prompts_[i].back() : tokens_[i].back();
    backend_.decode(ids.data(), batch, logits_.data());
  }
  emit(on_token);
  return !done();
}

}  // namespace adafuse
