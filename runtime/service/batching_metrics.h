// The in-flight executor's metrics (kept apart from metrics.cpp, which owns the service's other
// counters): queue wait (submit to slot), rows per step (batch occupancy) and prompt tokens per step,
// as Prometheus histograms. Thread-safe; Metrics::prometheus() appends prometheus().
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

#include "histogram.h"

namespace adafuse {

class BatchingMetrics {
 public:
  void queue_wait(double seconds);
  void step(int64_t rows, int64_t prefill_tokens);
  std::string prometheus() const;

 private:
  mutable std::mutex mutex_;
  Histogram queue_wait_{{0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0}};
  Histogram rows_{{1, 2, 4, 8, 16, 32, 64, 128, 256}};
  Histogram prefill_{{0, 16, 64, 256, 1024, 4096, 16384}};
};

}  // namespace adafuse
