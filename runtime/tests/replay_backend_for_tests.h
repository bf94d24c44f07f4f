// TEST ONLY: a backend that replays logits recorded by `adafuse-export run --save-logits`
// (a safetensors file with logits float32 [1, S, vocab]). The logits of position p are row p of the
// recording whatever the tokens are, so greedy decoding of a recorded greedy run reproduces it.
// It has no KV cache. The TensorRT backend is the only production backend.
#pragma once

#include <chrono>
#include <filesystem>
#include <vector>

#include "backend.h"

namespace adafuse {

class ReplayBackendForTests final : public Backend {
 public:
  ReplayBackendForTests(const std::filesystem::path& logits_file, int32_t max_batch, int32_t max_seq,
                        std::chrono::milliseconds step_delay = std::chrono::milliseconds(0));
  const BackendInfo& info() const override { return info_; }
  int64_t recorded_positions() const { return positions_; }
  // The n-th decode step (1-based, counted over the backend's life) fails as a sticky CUDA error
  // would: the step throws and the backend marks itself unusable. 0: never.
  void fail_as_sticky_at_decode(int64_t n) { sticky_at_decode_ = n; }

 protected:
  void do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits, int32_t* expert_ids,
                  float* gates) override;
  void do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) override;
  void do_read_kv(int32_t layer, bool value, float* out) const override;

 private:
  const float* row(int64_t position) const;
  BackendInfo info_;
  std::vector<float> logits_;
  int64_t positions_ = 0;
  std::chrono::milliseconds delay_;
  int64_t sticky_at_decode_ = 0, decodes_ = 0;
};

}  // namespace adafuse
