// What generation needs from an engine: prefill a batch, decode one token per sequence, expose the cache.
// The TensorRT backend is the production one; tests may put a replay of recorded logits behind it.
// The public methods check the arguments against the engine's limits (same refusals for every
// backend) and call the do_* hooks.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

namespace adafuse {

struct BackendInfo {
  int32_t max_batch = 0, max_seq = 0;  // the decode profile's limits
  int64_t vocab = 0;
  int32_t top_k = 0;  // routes fed to the engine per token (0: the engine routes inside)
  int32_t layers = 0, kv_heads = 0, head_dim = 0;
  std::string description;
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
  // The cached keys or values of one layer as float32 [batch, kv_heads, past_length, head_dim].
  void read_kv(int32_t layer, bool value, float* out) const;
  // Why the backend can run nothing more (a sticky CUDA error: every later call on the context fails
  // until the process restarts); empty while it is usable. Read from any thread (the service's /health).
  std::string unusable_reason() const;

 protected:
  virtual void do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits,
                          int32_t* expert_ids, float* gates) = 0;
  virtual void do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) = 0;
  virtual void do_read_kv(int32_t layer, bool value, float* out) const = 0;
  // Called by a backend that finds its device unusable; prefill and decode are refused from then on.
  void mark_unusable(const std::string& reason);

 private:
  void check_ids(const int64_t* ids, size_t n) const;
  void check_usable() const;
  int32_t past_ = 0, batch_ = 0;
  mutable std::mutex unusable_mutex_;
  std::string unusable_;
};

}  // namespace adafuse
