// What generation needs from an engine: prefill a batch, decode one token per sequence, expose the cache.
// The TensorRT backend is the production one; tests may put a replay of recorded logits behind it.
// The public methods check the arguments against the engine's limits (same refusals for every
// backend) and call the do_* hooks.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace adafuse {

struct BackendInfo {
  int32_t max_batch = 0, max_seq = 0;  // the decode profile's limits
  int64_t vocab = 0;
  int32_t top_k = 0;  // routes fed to the engine per token (0: the engine routes inside)
  int32_t layers = 0, kv_heads = 0, head_dim = 0;
  std::string description;
  // step() is available: sequences of different lengths share a batch, each in its own cache slot
  // (in-flight batching). Both the native and the TensorRT backend step (decoder_contract.h: a length per row).
  bool in_flight = false;
  // The most tokens one step() call takes over all its rows (a prompt longer than this is prefilled
  // in chunks by the caller); 0 when !in_flight.
  int32_t max_step_tokens = 0;
};

// One sequence's part of an in-flight step: `count` new tokens for cache slot `slot`, taking
// positions start .. start + count - 1. start may not exceed the tokens the slot holds (start 0
// begins a new sequence in the slot; start below its length rewinds it).
struct StepRow {
  int32_t slot = 0;
  int32_t start = 0;
  int32_t count = 1;
  bool all_logits = false;  // logits of every new position, else of the last one only
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const BackendInfo& info() const = 0;

  // Starts a new batch from ids [batch, len] (row-major). logits: [batch, len, vocab] when
  // all_positions, else [batch, vocab] for the last position. expert_ids/gates [batch, len, top_k]
  // receive the routes the engine was fed (may be null).
  void prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits,
               int32_t* expert_ids = nullptr, float* gates = nullptr);
  // ids [batch] continue the current batch by one token; logits [batch, vocab].
  void decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids = nullptr, float* gates = nullptr);
  int32_t past_length() const { return past_; }
  int32_t batch() const { return batch_; }
  // In-flight batching (info().in_flight): rows of distinct slots in [0, max_batch); ids holds their
  // new tokens concatenated in row order. logits receives, row after row, [count, vocab] float32 for a
  // row with all_logits, else [vocab] (its last position). expert_ids/gates [total tokens, top_k]
  // receive the routes (may be null). Checked like prefill/decode; the slot lengths move only when
  // the step succeeds.
  void step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids = nullptr,
            float* gates = nullptr);
  // Tokens slot `slot` holds (0 after release or before its first step).
  int32_t slot_length(int32_t slot) const;
  // Frees the slot for another sequence (its cache is simply overwritten later).
  void release(int32_t slot);
  // The cached keys or values of one layer as float32 [batch, kv_heads, past_length, head_dim].
  void read_kv(int32_t layer, bool value, float* out) const;
  // Why the backend can run nothing more (a sticky CUDA error: every later call on the context fails
  // until the process restarts); empty while it is usable. Read from any thread (the service's /health).
  std::string unusable_reason() const;
  // GPU time in ms of the last prefill, decode or step, from its first upload to its last download on the
  // backend's stream (CUDA events: the call's wall time minus it is the host's share); negative where the
  // backend does not measure it or before its first call.
  virtual double last_step_gpu_ms() const { return -1.0; }

 protected:
  virtual void do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits,
                          int32_t* expert_ids, float* gates) = 0;
  virtual void do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) = 0;
  virtual void do_read_kv(int32_t layer, bool value, float* out) const = 0;
  // Only backends with info().in_flight override this; the base refuses step() otherwise.
  virtual void do_step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids,
                       float* gates);
  // Called by a backend that finds its device unusable; prefill and decode are refused from then on.
  void mark_unusable(const std::string& reason);

 private:
  void check_ids(const int64_t* ids, size_t n) const;
  void check_usable() const;
  int32_t past_ = 0, batch_ = 0;
  std::vector<int32_t> slot_lengths_;  // in-flight slots, sized max_batch on first use
  mutable std::mutex unusable_mutex_;
  std::string unusable_;
};

}  // namespace adafuse
