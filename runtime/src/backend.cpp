#include "backend.h"

#include "error.h"

namespace adafuse {

void Backend::check_ids(const int64_t* ids, size_t n) const {
  if (ids == nullptr) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "token ids: NULL pointer");
  const int64_t vocab = info().vocab;
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, "token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                             " is out of the vocabulary [0, " + std::to_string(vocab) + ")");
}

std::string Backend::unusable_reason() const {
  std::lock_guard<std::mutex> lock(unusable_mutex_);
  return unusable_;
}

void Backend::mark_unusable(const std::string& reason) {
  std::lock_guard<std::mutex> lock(unusable_mutex_);
  if (unusable_.empty()) unusable_ = reason;  // the first failure is the cause; later ones follow from it
}

void Backend::check_usable() const {
  const std::string reason = unusable_reason();
  if (!reason.empty())
    fail(ADAFUSE_ERR_CUDA, "the engine cannot run after an earlier device error (" + reason + "); restart the process");
}

void Backend::prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits,
                      int32_t* expert_ids, float* gates) {
  const BackendInfo& in = info();
  if (batch < 1 || batch > in.max_batch)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "batch of " + std::to_string(batch) + " sequences: the engine's profile takes 1 to " +
                                           std::to_string(in.max_batch));
  if (len < 1 || len > in.max_seq)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt of " + std::to_string(len) + " tokens: the engine's profile takes 1 to " +
                                           std::to_string(in.max_seq));
  if (logits == nullptr) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "logits: NULL pointer");
  check_ids(ids, static_cast<size_t>(batch) * static_cast<size_t>(len));
  check_usable();
  past_ = batch_ = 0;  // a failed prefill leaves no batch behind
  do_prefill(ids, batch, len, all_positions, logits, expert_ids, gates);
  past_ = len;
  batch_ = batch;
}

void Backend::decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) {
  if (batch_ == 0) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "decode before prefill: no batch is running");
  if (batch != batch_)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "decode of " + std::to_string(batch) + " sequences, the running batch has " +
                                           std::to_string(batch_));
  if (past_ + 1 > info().max_seq)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "the batch holds " + std::to_string(past_) + " tokens: the engine's profile ends at " +
                                           std::to_string(info().max_seq));
  if (logits == nullptr) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "logits: NULL pointer");
  check_ids(ids, static_cast<size_t>(batch));
  check_usable();
  do_decode(ids, batch, logits, expert_ids, gates);
  ++past_;
}

void Backend::do_step(const int64_t*, const StepRow*, int32_t, float*, int32_t*, float*) {
  fail(ADAFUSE_ERR_UNSUPPORTED, info().description + ": this backend runs equal-length batches only (no in-flight step)");
}

int32_t Backend::slot_length(int32_t slot) const {
  if (slot < 0 || slot >= info().max_batch)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "slot " + std::to_string(slot) + " is outside [0, " + std::to_string(info().max_batch) + ")");
  return slot_lengths_.empty() ? 0 : slot_lengths_[static_cast<size_t>(slot)];
}

void Backend::release(int32_t slot) {
  slot_length(slot);  // range check
  if (!slot_lengths_.empty()) slot_lengths_[static_cast<size_t>(slot)] = 0;
}

void Backend::step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids,
                   float* gates) {
  const BackendInfo& in = info();
  // Qualified: the base's refusal, even where a subclass overrides do_step but reports !in_flight.
  if (!in.in_flight) Backend::do_step(ids, rows, n_rows, logits, expert_ids, gates);
  if (rows == nullptr) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "step rows: NULL pointer");
  if (n_rows < 1 || n_rows > in.max_batch)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "step of " + std::to_string(n_rows) + " sequences: the engine takes 1 to " +
                                           std::to_string(in.max_batch));
  if (logits == nullptr) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "logits: NULL pointer");
  if (slot_lengths_.empty()) slot_lengths_.assign(static_cast<size_t>(in.max_batch), 0);
  std::vector<bool> seen(static_cast<size_t>(in.max_batch), false);
  int64_t tokens = 0;
  for (int32_t r = 0; r < n_rows; ++r) {
    const StepRow& row = rows[r];
    const std::string what = "step row " + std::to_string(r) + " (slot " + std::to_string(row.slot) + ")";
    if (row.slot < 0 || row.slot >= in.max_batch)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, what + ": slot outside [0, " + std::to_string(in.max_batch) + ")");
    if (seen[static_cast<size_t>(row.slot)]) fail(ADAFUSE_ERR_INVALID_ARGUMENT, what + ": the slot appears twice in one step");
    seen[static_cast<size_t>(row.slot)] = true;
    const int32_t held = slot_lengths_[static_cast<size_t>(row.slot)];
    if (row.start < 0 || row.start > held)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, what + ": start " + std::to_string(row.start) + " is outside [0, " +
                                             std::to_string(held) + "] (the tokens the slot holds)");
    if (row.count < 1 || row.count > in.max_seq - row.start)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, what + ": " + std::to_string(row.count) + " tokens from position " +
                                             std::to_string(row.start) + " pass the engine's " + std::to_string(in.max_seq) +
                                             " positions");
    tokens += row.count;
  }
  if (tokens > in.max_step_tokens)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "step of " + std::to_string(tokens) + " tokens: the engine takes at most " +
                                           std::to_string(in.max_step_tokens) + " per step (prefill longer prompts in chunks)");
  check_ids(ids, static_cast<size_t>(tokens));
  check_usable();
  do_step(ids, rows, n_rows, logits, expert_ids, gates);
  for (int32_t r = 0; r < n_rows; ++r) slot_lengths_[static_cast<size_t>(rows[r].slot)] = rows[r].start + rows[r].count;
}

void Backend::read_kv(int32_t layer, bool value, float* out) const {
  if (layer < 0 || layer >= info().layers)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "layer " + std::to_string(layer) + " is outside [0, " + std::to_string(info().layers) + ")");
  if (out == nullptr) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "out: NULL pointer");
  if (batch_ == 0) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "read_kv before prefill: the cache is empty");
  do_read_kv(layer, value, out);
}

}  // namespace adafuse
