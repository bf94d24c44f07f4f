#include "replay_backend_for_tests.h"

#include <cstring>
#include <thread>

#include "error.h"
#include "safetensors.h"

namespace adafuse {

ReplayBackendForTests::ReplayBackendForTests(const std::filesystem::path& logits_file, int32_t max_batch, int32_t max_seq,
                                             std::chrono::milliseconds step_delay)
    : delay_(step_delay) {
  SafetensorsFile file(logits_file);
  const SafeTensor& t = file.get("logits", "F32", 3);
  if (t.shape[0] != 1 || t.shape[1] < 1 || t.shape[2] < 1)
    fail(ADAFUSE_ERR_FILE, logits_file.string() + ": logits must be [1, S, vocab] as `adafuse-export run --save-logits` writes");
  positions_ = t.shape[1];
  logits_.resize(static_cast<size_t>(t.numel()));
  std::memcpy(logits_.data(), t.data.data(), t.data.size());
  info_.max_batch = max_batch;
  info_.max_seq = max_seq;
  info_.vocab = t.shape[2];
  info_.description = "replay of " + logits_file.string() + " (tests only)";
}

const float* ReplayBackendForTests::row(int64_t position) const {
  if (position >= positions_)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "replay: position " + std::to_string(position) + " is beyond the " +
                                           std::to_string(positions_) + " recorded");
  return logits_.data() + static_cast<size_t>(position) * static_cast<size_t>(info_.vocab);
}

void ReplayBackendForTests::do_prefill(const int64_t*, int32_t batch, int32_t len, bool all_positions, float* logits,
                                       int32_t*, float*) {
  std::this_thread::sleep_for(delay_);
  const size_t v = static_cast<size_t>(info_.vocab);
  for (int32_t b = 0; b < batch; ++b)
    for (int32_t p = all_positions ? 0 : len - 1; p < len; ++p)
      std::memcpy(logits, row(p), v * sizeof(float)), logits += v;
}

void ReplayBackendForTests::do_decode(const int64_t*, int32_t batch, float* logits, int32_t*, float*) {
  std::this_thread::sleep_for(delay_);
  if (++decodes_ == sticky_at_decode_) {
    const std::string reason = "decode step: an illegal memory access was encountered (sticky error simulated by the replay backend)";
    mark_unusable(reason);
    fail(ADAFUSE_ERR_CUDA, reason);
  }
  const size_t v = static_cast<size_t>(info_.vocab);
  for (int32_t b = 0; b < batch; ++b) std::memcpy(logits + static_cast<size_t>(b) * v, row(past_length()), v * sizeof(float));
}

void ReplayBackendForTests::do_read_kv(int32_t, bool, float*) const {
  fail(ADAFUSE_ERR_INVALID_ARGUMENT, "the replay backend has no KV cache");
}

}  // namespace adafuse
