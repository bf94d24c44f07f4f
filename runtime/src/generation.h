// A batch of sequences decoded together: one prefill, then one decode step for every sequence at a
// time, each with its own sampling, token budget and stop ids. The engine takes one past length
// for the whole batch (no attention mask), so the prompts of a batch have equal lengths.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "adafuse/runtime.h"
#include "backend.h"
#include "sampling.h"

namespace adafuse {

struct SequenceOptions {
  adafuse_sampling sampling = adafuse_sampling_default();
  int32_t max_new_tokens = 16;
  std::vector<int64_t> stop_ids;
};

// Called with (sequence, token) for each new token; false stops that sequence.
using TokenCallback = std::function<bool(int32_t, int64_t)>;

enum class Finish { running, stop_token, length, cancelled };
const char* finish_name(Finish finish);

class Generation {
 public:
  // Checks every option and the limits before running anything.
  Generation(Backend& backend, std::vector<std::vector<int64_t>> prompts, std::vector<SequenceOptions> options);
  // Runs the prefill or one decode step; false when every sequence has finished.
  bool step(const TokenCallback& on_token);
  bool done() const;
  const std::vector<int64_t>& tokens(size_t sequence) const { return tokens_[sequence]; }
  Finish finish(size_t sequence) const { return finish_[sequence]; }
  size_t size() const { return prompts_.size(); }
  void cancel(size_t sequence);

 private:
  void emit(const TokenCallback& on_token);
  Backend& backend_;
  std::vector<std::vector<int64_t>> prompts_;
  std::vector<SequenceOptions> options_;
  std::vector<Sampler> samplers_;
  std::vector<std::vector<int64_t>> tokens_;
  std::vector<Finish> finish_;
  std::vector<float> logits_;
  bool started_ = false;
};

// Checks one sequence's options against the engine (token budget, stop ids in the vocabulary).
void check_sequence(const BackendInfo& info, size_t prompt_len, const SequenceOptions& options);

}  // namespace adafuse
