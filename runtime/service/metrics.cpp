#include "metrics.h"

#include <algorithm>
#include <sstream>

namespace adafuse {

void Metrics::request(int status_code) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++requests_[status_code];
}
void Metrics::cancelled() {
  std::lock_guard<std::mutex> lock(mutex_);
  ++cancelled_;
}
void Metrics::tokens(int64_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  tokens_ += static_cast<uint64_t>(n);
  recent_.emplace_back(Clock::now(), n);
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
  (prefill ? prefill_ : decode_).add(seconds);
}
void Metrics::first_token(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  ttft_.add(seconds);
}
void Metrics::inter_token(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  inter_token_.add(seconds);
}

double Metrics::recent_tokens_per_second() const {
  const auto now = Clock::now();
  const auto window = std::chrono::duration<double>(kRateWindowSeconds);
  while (!recent_.empty() && now - recent_.front().first > window) recent_.pop_front();
  int64_t n = 0;
  for (const auto& [when, count] : recent_) n += count;
  // A service younger than the window divides by its age, not by the whole window.
  const double span = std::min(kRateWindowSeconds, std::chrono::duration<double>(now - started_).count());
  return span > 0 ? static_cast<double>(n) / span : 0.0;
}

std::string Metrics::prometheus() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::ostringstream out;
  describe(out, "adafuse_requests_total", "counter", "Generate requests ended, by HTTP status (499: the client went away).");
  for (const auto& [code, n] : requests_) out << "adafuse_requests_total{code=\"" << code << "\"} " << n << "\n";
  describe(out, "adafuse_requests_cancelled_total", "counter", "Requests that ended cancelled, their client gone before the end.");
  out << "adafuse_requests_cancelled_total " << cancelled_ << "\n";
  describe(out, "adafuse_tokens_generated_total", "counter", "Tokens generated.");
  out << "adafuse_tokens_generated_total " << tokens_ << "\n";
  describe(out, "adafuse_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.");
  out << "adafuse_tokens_per_second " << recent_tokens_per_second() << "\n";
  describe(out, "adafuse_queue_depth", "gauge", "Requests waiting for a batch.");
  out << "adafuse_queue_depth " << queue_depth_ << "\n";
  describe(out, "adafuse_active_sequences", "gauge", "Sequences in the running batch.");
  out << "adafuse_active_sequences " << active_ << "\n";
  describe(out, "adafuse_step_latency_seconds", "histogram", "Engine step latency (one step for the whole batch).");
  prefill_.write(out, "adafuse_step_latency_seconds", "phase=\"prefill\"");
  decode_.write(out, "adafuse_step_latency_seconds", "phase=\"decode\"");
  describe(out, "adafuse_time_to_first_token_seconds", "histogram", "From a request's arrival to its first token.");
  ttft_.write(out, "adafuse_time_to_first_token_seconds");
  describe(out, "adafuse_inter_token_latency_seconds", "histogram", "Between consecutive tokens of one request.");
  inter_token_.write(out, "adafuse_inter_token_latency_seconds");
  out << batching_.prometheus();
  return out.str();
}

}  // namespace adafuse
