// A Prometheus histogram (cumulative buckets, sum, count) and its text form, shared by the
// service's metrics (metrics.h) and the executor's batching metrics (batching_metrics.h).
// Not thread-safe: its owner locks.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace adafuse {

struct Histogram {
  explicit Histogram(std::vector<double> bounds) : bounds(std::move(bounds)), counts(this->bounds.size(), 0) {}
  void add(double value) {
    for (size_t i = 0; i < bounds.size(); ++i)
      if (value <= bounds[i]) ++counts[i];
    ++count;
    sum += value;
  }
  // The sample lines of metric `name`; `labels` (e.g. phase="decode") is put before le, or nothing.
  void write(std::ostream& out, const std::string& name, const std::string& labels = "") const {
    const std::string pre = labels.empty() ? "" : labels + ",";
    const std::string own = labels.empty() ? "" : "{" + labels + "}";
    for (size_t i = 0; i < bounds.size(); ++i) out << name << "_bucket{" << pre << "le=\"" << bounds[i] << "\"} " << counts[i] << "\n";
    out << name << "_bucket{" << pre << "le=\"+Inf\"} " << count << "\n"
        << name << "_sum" << own << " " << sum << "\n"
        << name << "_count" << own << " " << count << "\n";
  }
  std::vector<double> bounds;
  std::vector<uint64_t> counts;  // per bound, cumulative as Prometheus wants (value <= bound)
  uint64_t count = 0;
  double sum = 0.0;
};

// "# HELP" and "# TYPE" lines of a metric.
inline void describe(std::ostream& out, const char* name, const char* type, const char* help) {
  out << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
}

}  // namespace adafuse
