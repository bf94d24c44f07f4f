#include "batching_metrics.h"

#include <sstream>

namespace adafuse {

void BatchingMetrics::queue_wait(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  queue_wait_.add(seconds);
}

void BatchingMetrics::step(int64_t rows, int64_t prefill_tokens) {
  std::lock_guard<std::mutex> lock(mutex_);
  rows_.add(static_cast<double>(rows));
  prefill_.add(static_cast<double>(prefill_tokens));
}

std::string BatchingMetrics::prometheus() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::ostringstream out;
  auto write = [&](const char* name, const char* help, const Histogram& h) {
    describe(out, name, "histogram", help);
    h.write(out, name);
  };
  write("adafuse_queue_wait_seconds", "Time from a request's arrival to its first engine step (slot or batch taken).", queue_wait_);
  write("adafuse_batch_rows", "Sequences per engine step (batch occupancy).", rows_);
  write("adafuse_step_prefill_tokens", "Prompt tokens per engine step (prefill chunks).", prefill_);
  return out.str();
}

}  // namespace adafuse
