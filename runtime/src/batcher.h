// In-flight batching over Backend::step (backends with info().in_flight): sequences of any length join
// and leave the running batch at step boundaries, each in its own cache slot, and one step carries the
// decode token of every running sequence plus prefill chunks of the newcomers.
//
// Wait policy (what bounds how long a short request waits behind long ones):
// - A step carries at most `step_tokens` tokens (default: the backend's max_step_tokens). Decode rows
//   come first: every sequence that has finished its prompt gets its next token in every step, so a long
//   prompt arriving never stalls the others for longer than one step of step_tokens tokens.
// - The rest of the step is prefill, shared max-min fairly among the sequences still prefilling (each
//   gets an equal share, capped by what it still needs; what a short prompt leaves goes to the others;
//   a remainder goes to the oldest first). Since at most max_batch sequences hold slots, a prompt of L
//   tokens gets at least floor(step_tokens / max_batch) tokens per step, so its first token comes at
//   most ceil(L / floor(step_tokens / max_batch)) steps after it takes a slot, whatever the lengths of
//   the prompts beside it (prefill_bound_steps()).
// - Slots are taken in arrival order (the caller's queue); a slot frees the moment its sequence ends,
//   is cancelled or fails, and the next waiting request takes it at the next step boundary. There is no
//   preemption: the wait for a slot is bounded by the running sequences' token budgets.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend.h"
#include "generation.h"
#include "sampling.h"

namespace adafuse {

struct SequenceHooks {
  // Called for each new token; false cancels the sequence (it ends with Finish::cancelled).
  std::function<bool(int64_t)> on_token;
  // Polled at each step boundary (from the batcher's thread); true cancels the sequence there and
  // frees its slot before the next step runs. For a flag set by another thread (a client went away).
  std::function<bool()> cancelled;
};

struct FinishedSequence {
  uint64_t id = 0;
  std::vector<int64_t> tokens;
  Finish finish = Finish::running;
  std::string error;  // non-empty when the step that held the sequence failed
  adafuse_status status = ADAFUSE_OK;  // the failure's status (ADAFUSE_ERR_CUDA, ...) when error is set
};

// What one step carried (for metrics and tests).
struct BatchStepStats {
  int32_t rows = 0;             // sequences in the step
  int32_t decode_rows = 0;      // of them, sequences past their prompt (one token each)
  int64_t prefill_tokens = 0;   // prompt tokens over all prefill chunks
  int32_t new_tokens = 0;       // tokens sampled (decode rows and prompts completed in the step)
  double seconds = 0.0;         // the backend step's wall time
};

class InFlightBatcher {
 public:
  // step_tokens: the most tokens per step, 0 for the backend's max_step_tokens; it must be at least
  // max_batch (every slot may decode while a prompt is prefilled) and at most max_step_tokens.
  explicit InFlightBatcher(Backend& backend, int32_t step_tokens = 0);
  // Releases the slots still held (the backend outlives the batcher).
  ~InFlightBatcher();
  InFlightBatcher(const InFlightBatcher&) = delete;
  InFlightBatcher& operator=(const InFlightBatcher&) = delete;

  // Checks the sequence (prompt ids, options) against the engine and puts it into a free slot; its
  // prompt is prefilled from the next step on. Returns its id. Refused when no slot is free.
  uint64_t admit(std::vector<int64_t> prompt, const SequenceOptions& options, SequenceHooks hooks = {});
  // Ends a sequence as cancelled and frees its slot now (between steps); false when it is not running.
  bool cancel(uint64_t id);
  // Ends the sequences whose hooks.cancelled() is true and frees their slots; returns them.
  std::vector<FinishedSequence> drop_cancelled();
  // One Backend::step for every running sequence (drop_cancelled() first). Returns the sequences that
  // ended in it (stop id, budget, callback, cancellation, or the step failing: then every sequence of
  // the step ends with the error and its slot is freed; the batcher stays usable).
  std::vector<FinishedSequence> step();

  size_t running() const { return sequences_.size(); }
  int32_t free_slots() const;
  int32_t step_tokens() const { return step_tokens_; }
  const BatchStepStats& last_step() const { return last_; }
  // The most steps between taking a slot and the first token for a prompt of `prompt_len` tokens.
  int64_t prefill_bound_steps(int64_t prompt_len) const;
  const BackendInfo& info() const { return backend_.info(); }

 private:
  struct Sequence {
    uint64_t id;
    int32_t slot;
    std::vector<int64_t> prompt;
    SequenceOptions options;
    SequenceHooks hooks;
    Sampler sampler;
    std::vector<int64_t> tokens;
    int32_t prefilled = 0;  // prompt tokens already in the cache
    int32_t chunk = 0;      // tokens this sequence carries in the step being built
    Finish finish = Finish::running;
    std::string error;  // set when its step (or its token callback) failed: it ends with the error
    adafuse_status status = ADAFUSE_OK;
  };
  void plan_prefill(int64_t budget);
  void emit(Sequence& s, const float* logits);
  // Moves the ended sequences out (their slots released) in admission order.
  std::vector<FinishedSequence> collect_finished();

  Backend& backend_;
  int32_t step_tokens_ = 0;
  uint64_t next_id_ = 1;
  std::vector<Sequence> sequences_;  // in admission order
  std::vector<bool> slot_taken_;
  std::vector<int64_t> ids_;
  std::vector<StepRow> rows_;
  std::vector<float> logits_;
  BatchStepStats last_;
};

}  // namespace adafuse
