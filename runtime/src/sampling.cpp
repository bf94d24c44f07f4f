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

namespace {

// The checks every draw makes: options in range, a vocabulary, no NaN logit.
void check_logits(const adafuse_sampling& o, const float* logits, int64_t vocab) {
  check_sampling(o);
  if (vocab < 1) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "sampling needs a vocabulary of at least 1, found " + std::to_string(vocab));
  for (int64_t i = 0; i < vocab; ++i)
    if (std::isnan(logits[i])) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "logits hold NaN at token " + std::to_string(i));
}

bool greedy(const adafuse_sampling& o) { return o.temperature == 0.0f || o.top_k == 1; }

}  // namespace

void SamplingSet::select(const adafuse_sampling& o, const float* logits, int64_t vocab) {
  const size_t n = static_cast<size_t>(vocab);
  // Rank: higher logit first, ties by lower id, so top-k / top-p keep a well-defined set.
  const auto before = [logits](int64_t a, int64_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  const double t = static_cast<double>(o.temperature);
  ids.resize(n);
  std::iota(ids.begin(), ids.end(), int64_t{0});
  size_t keep = n;
  if (o.top_k > 0 && static_cast<size_t>(o.top_k) < n) {
    keep = static_cast<size_t>(o.top_k);
    std::nth_element(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(keep - 1), ids.end(), before);
    std::sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(keep), before);
  }
  const double top = static_cast<double>(*std::max_element(logits, logits + vocab)) / t;
  weights.resize(keep);
  total = 0.0;
  for (size_t i = 0; i < keep; ++i) total += weights[i] = std::exp(static_cast<double>(logits[ids[i]]) / t - top);
  ids.resize(keep);
  if (o.top_p >= 1.0f) return;
  // The smallest rank prefix whose probability reaches top_p (at least one token). Without top-k the set is
  // still unordered: order growing candidate sets (64, 256, ...) until one reaches top_p, which a peaked
  // distribution does long before the whole vocabulary.
  const double target = static_cast<double>(o.top_p) * total;
  size_t ordered = keep < n ? keep : 0;  // top-k ordered its cut already
  double cum = 0.0;
  size_t i = 0;
  for (size_t m = 64;; m *= 4) {
    if (ordered < keep) {  // order the next candidates after those already ordered
      const size_t upto = std::min(m, keep);
      const auto from = ids.begin() + static_cast<std::ptrdiff_t>(ordered);
      if (upto < keep) std::nth_element(from, ids.begin() + static_cast<std::ptrdiff_t>(upto - 1), ids.end(), before);
      std::sort(from, ids.begin() + static_cast<std::ptrdiff_t>(upto), before);
      for (size_t j = ordered; j < upto; ++j) weights[j] = std::exp(static_cast<double>(logits[ids[j]]) / t - top);
      ordered = upto;
    }
    for (; i < ordered; ++i) {
      cum += weights[i];
      if (cum >= target || i + 1 == keep) {
        ids.resize(i + 1);
        weights.resize(i + 1);
        total = cum;
        return;
      }
    }
  }
}

std::vector<double> sampling_distribution(const adafuse_sampling& o, const float* logits, int64_t vocab) {
  check_logits(o, logits, vocab);
  std::vector<double> p(static_cast<size_t>(vocab), 0.0);
  if (greedy(o)) {
    p[static_cast<size_t>(argmax(logits, vocab))] = 1.0;
    return p;
  }
  SamplingSet set;
  set.select(o, logits, vocab);
  for (size_t i = 0; i < set.ids.size(); ++i) p[static_cast<size_t>(set.ids[i])] = set.weights[i] / set.total;
  return p;
}

Sampler::Sampler(const adafuse_sampling& options) : options_(options), rng_(options.seed) { check_sampling(options); }

int64_t Sampler::next(const float* logits, int64_t vocab) {
  check_logits(options_, logits, vocab);
  if (greedy(options_)) return argmax(logits, vocab);
  set_.select(options_, logits, vocab);
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * set_.total;  // uniform in [0, total)
  double cum = 0.0;
  for (size_t i = 0; i < set_.ids.size(); ++i) {
    cum += set_.weights[i];
    if (u < cum) return set_.ids[i];
  }
  return set_.ids.back();  // u within rounding of the total
}

}  // namespace adafuse
