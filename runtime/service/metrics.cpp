#include "metrics.h"

#include <sstream>

namespace adafuse {

void Metrics::request(int status_code) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++requests_[status_code];
}
void Metrics::tokens(int64_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  tokens_ += static_cast<uint64_t>(n);
}
void Metrics::queue_depth(int64_t depth) {
  std::lock_guard<std::mutex> lock(mutex_);
  queue_depth_ = depth;
}
void Metrics::active_sequences(int64_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  active_ = n;
}
void Metrics::step(bool prefill, double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  Histogram& h = prefill ? prefill_ : decode_;
  for (size_t i = 0; i < kBuckets.size(); ++i)
    if (seconds <= kBuckets[i]) ++h.counts[i];
  ++h.count;
  h.sum += seconds;
}

std::string Metrics::prometheus() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::ostringstream out;
  out << "# HELP adafuse_requests_total Generate requests answered, by HTTP status.\n"
         "# TYPE adafuse_requests_total counter\n";
  for (const auto& [code, n] : requests_) out << "adafuse_requests_total{code=\"" << code << "\"} " << n << "\n";
  out << "# HELP adafuse_tokens_generated_total Tokens generated.\n# TYPE adafuse_tokens_generated_total counter\n"
      << "adafuse_tokens_generated_total " << tokens_ << "\n"
      << "# HELP adafuse_queue_depth Requests waiting for a batch.\n# TYPE adafuse_queue_depth gauge\n"
      << "adafuse_queue_depth " << queue_depth_ << "\n"
      << "# HELP adafuse_active_sequences Sequences in the running batch.\n# TYPE adafuse_active_sequences gauge\n"
      << "adafuse_active_sequences " << active_ << "\n"
      << "# HELP adafuse_step_latency_seconds Engine step latency (one step for the whole batch).\n"
         "# TYPE adafuse_step_latency_seconds histogram\n";
  for (const auto& [phase, h] : {std::pair<const char*, const Histogram&>{"prefill", prefill_}, {"decode", decode_}}) {
    for (size_t i = 0; i < kBuckets.size(); ++i)
      out << "adafuse_step_latency_seconds_bucket{phase=\"" << phase << "\",le=\"" << kBuckets[i] << "\"} " << h.counts[i] << "\n";
    out << "adafuse_step_latency_seconds_bucket{phase=\"" << phase << "\",le=\"+Inf\"} " << h.count << "\n"
        << "adafuse_step_latency_seconds_sum{phase=\"" << phase << "\"} " << h.sum << "\n"
        << "adafuse_step_latency_seconds_count{phase=\"" << phase << "\"} " << h.count << "\n";
  }
  out << batching_.prometheus();
  return out.str();
}

}  // namespace adafuse
