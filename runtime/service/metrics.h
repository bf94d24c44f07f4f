// Service counters in Prometheus text format (GET /metrics): requests by status code, generated
// tokens, queue depth, active sequences, and the latency of engine steps (prefill and decode).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "batching_metrics.h"

namespace adafuse {

class Metrics {
 public:
  void request(int status_code);
  void tokens(int64_t n);
  void queue_depth(int64_t depth);
  void active_sequences(int64_t n);
  void step(bool prefill, double seconds);
  std::string prometheus() const;
  // The executor's batching histograms (batching_metrics.h), appended to prometheus().
  BatchingMetrics& batching() { return batching_; }

 private:
  static constexpr std::array<double, 10> kBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0};
  struct Histogram {
    std::array<uint64_t, kBuckets.size()> counts{};
    uint64_t count = 0;
    double sum = 0.0;
  };
  mutable std::mutex mutex_;
  std::map<int, uint64_t> requests_;
  uint64_t tokens_ = 0;
  int64_t queue_depth_ = 0, active_ = 0;
  Histogram prefill_, decode_;
  BatchingMetrics batching_;
};

}  // namespace adafuse
