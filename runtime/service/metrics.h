// Service metrics in Prometheus text format (GET /metrics); runtime/README.md says what each means.
// Requests are counted by status code when they end (a stream when its last byte went out, or 499
// when its client went away); latencies per request (time to first token, inter-token) and per
// engine step; tokens generated, as a counter and as a rate over the last 10 s.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "batching_metrics.h"
#include "histogram.h"

namespace adafuse {

class Metrics {
 public:
  void request(int status_code);
  // A request that ended cancelled (its client went away, or it was cancelled while queued).
  void cancelled();
  void tokens(int64_t n);
  void queue_depth(int64_t depth);
  void active_sequences(int64_t n);
  void step(bool prefill, double seconds);
  // A request's first token, `seconds` after it arrived; a later token, `seconds` after its previous one.
  void first_token(double seconds);
  void inter_token(double seconds);
  std::string prometheus() const;
  // The executor's batching histograms (batching_metrics.h), appended to prometheus().
  BatchingMetrics& batching() { return batching_; }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr double kRateWindowSeconds = 10.0;
  static std::vector<double> latency_bounds() { return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0}; }
  // Tokens per second over the last kRateWindowSeconds (or since the first token, when sooner).
  double recent_tokens_per_second() const;

  mutable std::mutex mutex_;
  std::map<int, uint64_t> requests_;
  uint64_t tokens_ = 0, cancelled_ = 0;
  int64_t queue_depth_ = 0, active_ = 0;
  Histogram prefill_{latency_bounds()}, decode_{latency_bounds()};
  Histogram ttft_{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0}};
  Histogram inter_token_{latency_bounds()};
  mutable std::deque<std::pair<Clock::time_point, int64_t>> recent_;  // (when, tokens) within the window
  Clock::time_point started_ = Clock::now();
  BatchingMetrics batching_;
};

}  // namespace adafuse
