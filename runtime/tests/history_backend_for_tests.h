// TEST ONLY: an in-flight backend with real per-sequence state and no model. The logits of a position
// are a pure function of the whole token history of its slot up to and including that position (a
// rolling hash of the tokens seeds a PRNG that fills the vocabulary), so any correct batching gives
// exactly the tokens of running each request alone, and any mix-up of slots, positions, starts or
// chunk boundaries changes them. It also runs the equal-length prefill/decode path (row b is slot b),
// so the two executors can be compared on one definition. The production backends are TensorRT and native.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <vector>

#include "backend.h"
#include "generation.h"

namespace adafuse {

struct HistoryBackendOptions {
  int32_t max_batch = 8, max_seq = 1024, max_step_tokens = 256;
  int64_t vocab = 32;
  bool in_flight = true;
  // Simulated cost of a step: a fixed delay plus a cost per token it carries (long prefills are slow).
  std::chrono::microseconds step_delay{0}, per_token_cost{0};
};

// One step() call as the backend saw it (the tests check what the executor asked for).
struct HistoryStepRecord {
  std::vector<StepRow> rows;
  int64_t tokens = 0;
};

class HistoryBackendForTests final : public Backend {
 public:
  explicit HistoryBackendForTests(const HistoryBackendOptions& options);
  const BackendInfo& info() const override { return info_; }

  // The hash of a history after `token`, from the hash before it (the empty history hashes to kEmpty).
  static constexpr uint64_t kEmpty = 0x6a09e667f3bcc908ull;
  static uint64_t extend(uint64_t hash, int64_t token);
  // The logits [vocab] that follow a history with this hash: uniform in [-4, 4) from splitmix64(hash).
  static void logits_of(uint64_t hash, int64_t vocab, float* out);
  // Same, straight from a whole history (the solo reference of the tests).
  static std::vector<float> logits_after(const std::vector<int64_t>& history, int64_t vocab);

  // The tokens one sequence gets when it runs alone: its history hashed position by position, no
  // slots, steps or chunks involved (the reference every batching must equal). Stops like the
  // executors: a stop id or max_new_tokens.
  static std::vector<int64_t> solo_tokens(const std::vector<int64_t>& prompt, const SequenceOptions& options, int64_t vocab);

  // The n-th call of step() / decode() (1-based over the backend's life) throws ADAFUSE_ERR_CUDA
  // (a transient failure: the backend stays usable). 0: never.
  void fail_at_step(int64_t n) { fail_at_ = n; }
  // Every step() so far, in order (thread-safe copy).
  std::vector<HistoryStepRecord> steps() const;
  int64_t step_count() const;
  // The tokens the backend holds for a slot (its own record, beside the base's slot_length()).
  std::vector<int64_t> history(int32_t slot) const;

 protected:
  void do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits, int32_t* expert_ids,
                  float* gates) override;
  void do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) override;
  void do_step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids,
               float* gates) override;
  void do_read_kv(int32_t layer, bool value, float* out) const override;

 private:
  void simulate_cost(int64_t tokens) const;
  void maybe_fail();
  // Feeds `count` tokens to slot `slot` from position `start`; writes the logits of every new
  // position (all) or of the last one.
  void feed(int32_t slot, int32_t start, const int64_t* ids, int32_t count, bool all, float* logits);

  BackendInfo info_;
  std::chrono::microseconds step_delay_, per_token_cost_;
  // Per slot: tokens and the hash after each of them (hashes_[s][p] covers tokens 0..p).
  std::vector<std::vector<int64_t>> tokens_;
  std::vector<std::vector<uint64_t>> hashes_;
  mutable std::mutex record_mutex_;
  std::vector<HistoryStepRecord> steps_;
  int64_t calls_ = 0, fail_at_ = 0;
};

}  // namespace adafuse
