// Token sampling: greedy, temperature, top-k, top-p, from a seeded random stream.
// The random stream is std::mt19937_64 (fully specified by the C++ standard) and its 53 high bits
// make the uniform draw, so a seed gives the same tokens on every platform.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "adafuse/runtime.h"

namespace adafuse {

// Refuses options out of range (negative temperature, top_p outside (0, 1], negative top_k).
void check_sampling(const adafuse_sampling& options);

// The distribution sampled from, float64 [vocab] (zeros outside top-k / top-p); greedy: one-hot.
std::vector<double> sampling_distribution(const adafuse_sampling& options, const float* logits, int64_t vocab);

// The tokens a draw may take and their weights, found without sorting the vocabulary: top-k by partial
// selection, the top-p prefix by selecting growing candidate sets until they reach top_p, and plain
// temperature sampling with no ordering at all. Buffers are reused from token to token.
struct SamplingSet {
  std::vector<int64_t> ids;  // the kept tokens (in rank order when top-k or top-p cut the vocabulary)
  std::vector<double> weights;  // exp((logit - max) / temperature) of each kept token
  double total = 0.0;
  void select(const adafuse_sampling& options, const float* logits, int64_t vocab);
};

class Sampler {
 public:
  explicit Sampler(const adafuse_sampling& options);
  int64_t next(const float* logits, int64_t vocab);

 private:
  adafuse_sampling options_;
  std::mt19937_64 rng_;
  SamplingSet set_;
};

}  // namespace adafuse
