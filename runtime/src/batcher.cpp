#include "batcher.h"

#include <algorithm>

#include "error.h"

namespace adafuse {

InFlightBatcher::InFlightBatcher(Backend& backend, int32_t step_tokens) : backend_(backend) {
  const BackendInfo& in = backend.info();
  if (!in.in_flight)
    fail(ADAFUSE_ERR_UNSUPPORTED, in.description + ": in-flight batching needs a backend with step(); this one runs "
                                                   "equal-length batches only");
  step_tokens_ = step_tokens == 0 ? in.max_step_tokens : step_tokens;
  if (step_tokens_ < in.max_batch || step_tokens_ > in.max_step_tokens)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "step_tokens " + std::to_string(step_tokens_) + ": expected max_batch (" +
                                           std::to_string(in.max_batch) + ") to the backend's max_step_tokens (" +
                                           std::to_string(in.max_step_tokens) + ")");
  slot_taken_.assign(static_cast<size_t>(in.max_batch), false);
}

InFlightBatcher::~InFlightBatcher() {
  for (const auto& s : sequences_) backend_.release(s.slot);
}

int32_t InFlightBatcher::free_slots() const {
  return static_cast<int32_t>(std::count(slot_taken_.begin(), slot_taken_.end(), false));
}

int64_t InFlightBatcher::prefill_bound_steps(int64_t prompt_len) const {
  const int64_t per_step = step_tokens_ / backend_.info().max_batch;
  return (prompt_len + per_step - 1) / per_step;
}

uint64_t InFlightBatcher::admit(std::vector<int64_t> prompt, const SequenceOptions& options, SequenceHooks hooks) {
  const BackendInfo& in = backend_.info();
  if (prompt.empty()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= in.vocab)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt id " + std::to_string(prompt[i]) + " at position " + std::to_string(i) +
                                             " is out of the vocabulary [0, " + std::to_string(in.vocab) + ")");
  check_sequence(in, prompt.size(), options);
  const auto free = std::find(slot_taken_.begin(), slot_taken_.end(), false);
  if (free == slot_taken_.end())
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "no free slot: all " + std::to_string(in.max_batch) + " hold running sequences");
  *free = true;
  const int32_t slot = static_cast<int32_t>(free - slot_taken_.begin());
  sequences_.push_back(Sequence{next_id_, slot, std::move(prompt), options, std::move(hooks), Sampler(options.sampling), {}, 0, 0,
                                Finish::running, "", ADAFUSE_OK});
  return next_id_++;
}

bool InFlightBatcher::cancel(uint64_t id) {
  for (auto& s : sequences_)
    if (s.id == id && s.finish == Finish::running && s.error.empty()) {
      s.finish = Finish::cancelled;
      return true;
    }
  return false;
}

std::vector<FinishedSequence> InFlightBatcher::collect_finished() {
  // Ended sequences to the back (admission order kept on both sides), then moved out.
  const auto first_ended = std::stable_partition(sequences_.begin(), sequences_.end(), [](const Sequence& s) {
    return s.finish == Finish::running && s.error.empty();
  });
  std::vector<FinishedSequence> out;
  for (auto it = first_ended; it != sequences_.end(); ++it) {
    backend_.release(it->slot);  // its cache is free for the next sequence from the next step on
    slot_taken_[static_cast<size_t>(it->slot)] = false;
    out.push_back(FinishedSequence{it->id, std::move(it->tokens), it->finish, std::move(it->error), it->status});
  }
  sequences_.erase(first_ended, sequences_.end());
  return out;
}

std::vector<FinishedSequence> InFlightBatcher::drop_cancelled() {
  for (auto& s : sequences_)
    if (s.finish == Finish::running && s.hooks.cancelled && s.hooks.cancelled()) s.finish = Finish::cancelled;
  return collect_finished();
}

// Max-min fair shares of `budget` prompt tokens among the sequences still prefilling: rounds of an
// equal share (at least 1), each capped by what the sequence still needs, oldest first within a round.
void InFlightBatcher::plan_prefill(int64_t budget) {
  for (auto& s : sequences_) s.chunk = 0;
  auto need = [](const Sequence& s) { return static_cast<int64_t>(s.prompt.size()) - s.prefilled - s.chunk; };
  while (budget > 0) {
    const int64_t waiting = std::count_if(sequences_.begin(), sequences_.end(), [&](const Sequence& s) { return need(s) > 0; });
    if (waiting == 0) return;
    const int64_t share = std::max<int64_t>(1, budget / waiting);
    for (auto& s : sequences_) {
      const int64_t give = std::min({need(s), share, budget});
      if (give <= 0) continue;
      s.chunk += static_cast<int32_t>(give);
      budget -= give;
      if (budget == 0) return;
    }
  }
}

void InFlightBatcher::emit(Sequence& s, const float* logits) {
  const int64_t token = s.sampler.next(logits, backend_.info().vocab);
  s.tokens.push_back(token);
  const auto& stop = s.options.stop_ids;
  if (std::find(stop.begin(), stop.end(), token) != stop.end())
    s.finish = Finish::stop_token;
  else if (s.tokens.size() >= static_cast<size_t>(s.options.max_new_tokens))
    s.finish = Finish::length;
  if (!s.hooks.on_token) return;
  try {
    if (!s.hooks.on_token(token) && s.finish == Finish::running) s.finish = Finish::cancelled;
  } catch (const std::exception& e) {  // the caller's callback: it ends its own sequence only
    s.error = std::string("token callback failed: ") + e.what();
    s.status = ADAFUSE_ERR_INTERNAL;
  }
}

std::vector<FinishedSequence> InFlightBatcher::step() {
  std::vector<FinishedSequence> finished = drop_cancelled();
  last_ = BatchStepStats{};
  if (sequences_.empty()) return finished;
  const int64_t decoding = std::count_if(sequences_.begin(), sequences_.end(),
                                         [](const Sequence& s) { return s.prefilled == static_cast<int32_t>(s.prompt.size()); });
  plan_prefill(step_tokens_ - decoding);
  rows_.clear();
  ids_.clear();
  std::vector<Sequence*> in_step;
  for (auto& s : sequences_) {
    const int32_t prompt_len = static_cast<int32_t>(s.prompt.size());
    if (s.prefilled == prompt_len) {  // decode: the last token, never fed yet, at the slot's next position
      rows_.push_back(StepRow{s.slot, prompt_len + static_cast<int32_t>(s.tokens.size()) - 1, 1, false});
      ids_.push_back(s.tokens.back());
      ++last_.decode_rows;
    } else if (s.chunk > 0) {
      rows_.push_back(StepRow{s.slot, s.prefilled, s.chunk, false});
      ids_.insert(ids_.end(), s.prompt.begin() + s.prefilled, s.prompt.begin() + s.prefilled + s.chunk);
      last_.prefill_tokens += s.chunk;
    } else {
      continue;  // cannot happen while step_tokens >= max_batch; kept safe
    }
    in_step.push_back(&s);
  }
  last_.rows = static_cast<int32_t>(rows_.size());
  const size_t vocab = static_cast<size_t>(backend_.info().vocab);
  logits_.resize(rows_.size() * vocab);
  const auto start = std::chrono::steady_clock::now();
  try {
    backend_.step(ids_.data(), rows_.data(), last_.rows, logits_.data());
  } catch (const std::exception& e) {
    // The requests in this step fail; the slots are released and the batcher goes on with the next ones.
    const std::string what = e.what();
    const auto* error = dynamic_cast<const Error*>(&e);
    for (Sequence* s : in_step) {
      s->error = what.empty() ? "the engine step failed" : what;
      s->status = error ? error->status() : ADAFUSE_ERR_INTERNAL;
    }
    last_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    auto failed = collect_finished();
    finished.insert(finished.end(), std::make_move_iterator(failed.begin()), std::make_move_iterator(failed.end()));
    return finished;
  }
  last_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (size_t r = 0; r < in_step.size(); ++r) {
    Sequence& s = *in_step[r];
    const float* row_logits = logits_.data() + r * vocab;
    if (s.prefilled < static_cast<int32_t>(s.prompt.size())) {
      s.prefilled += s.chunk;
      if (s.prefilled < static_cast<int32_t>(s.prompt.size())) continue;  // more chunks to come
    }
    emit(s, row_logits);
    ++last_.new_tokens;
  }
  auto ended = collect_finished();
  finished.insert(finished.end(), std::make_move_iterator(ended.begin()), std::make_move_iterator(ended.end()));
  return finished;
}

}  // namespace adafuse
