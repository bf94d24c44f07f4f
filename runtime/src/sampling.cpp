#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "error.h"

namespace adafuse {

void check_sampling(const adafuse_sampling& o) {
  if (!(o.temperature >= 0.0f) || !std::isfinite(o.temperature))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "sampling temperature must be >= 0, found " + std::to_string(o.temperature));
  if (o.top_k < 0) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "sampling top_k must be >= 0 (0: off), found " + std::to_string(o.top_k));
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "sampling top_p must be in (0, 1] (1: off), found " + std::to_string(o.top_p));
}

namespace {

int64_t argmax(const float* logits, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;  // first maximum, like numpy/torch argmax
  return best;
}

}  // namespace

std::vector<double> sampling_distribution(const adafuse_sampling& o, const float* logits, int64_t vocab) {
  check_sampling(o);
  if (vocab < 1) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "sampling needs a vocabulary of at least 1, found " + std::to_string(vocab));
  for (int64_t i = 0; i < vocab; ++i)
    if (std::isnan(logits[i])) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "logits hold NaN at token " + std::to_string(i));
  std::vector<double> p(static_cast<size_t>(vocab), 0.0);
  if (o.temperature == 0.0f || o.top_k == 1) {
    p[static_cast<size_t>(argmax(logits, vocab))] = 1.0;
    return p;
  }
  // Order tokens by logit, ties by id, so top-k/top-p keep a well-defined set.
  std::vector<int64_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  size_t keep = order.size();
  if (o.top_k > 0) keep = std::min(keep, static_cast<size_t>(o.top_k));
  const double top = static_cast<double>(logits[order[0]]) / o.temperature;
  std::vector<double> w(keep);
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) total += w[i] = std::exp(static_cast<double>(logits[order[i]]) / o.temperature - top);
  if (o.top_p < 1.0f) {
    // The smallest prefix whose probability reaches top_p (at least one token).
    double cum = 0.0;
    size_t n = 0;
    while (n < keep) {
      cum += w[n] / total;
      ++n;
      if (cum >= static_cast<double>(o.top_p)) break;
    }
    keep = n;
    total = std::accumulate(w.begin(), w.begin() + static_cast<std::ptrdiff_t>(keep), 0.0);
  }
  for (size_t i = 0; i < keep; ++i) p[static_cast<size_t>(order[i])] = w[i] / total;
  return p;
}

Sampler::Sampler(const adafuse_sampling& options) : options_(options), rng_(options.seed) { check_sampling(options); }

int64_t Sampler::next(const float* logits, int64_t vocab) {
  if (options_.temperature == 0.0f || options_.top_k == 1) {
    sampling_distribution(options_, logits, vocab);  // same checks as the sampled path
    return argmax(logits, vocab);
  }
  const std::vector<double> p = sampling_distribution(options_, logits, vocab);
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;  // uniform in [0, 1)
  double cum = 0.0;
  int64_t last = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (p[static_cast<size_t>(i)] == 0.0) continue;
    cum += p[static_cast<size_t>(i)];
    last = i;
    if (u < cum) return i;
  }
  return last;  // u within rounding of 1
}

}  // namespace adafuse
