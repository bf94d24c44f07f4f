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

class Sampler {
 public:
  explicit Sampler(const adafuse_sampling& options);
  int64_t next(const float* logits, int64_t vocab);

 private:
  adafuse_sampling options_;
  std::mt19937_64 rng_;
};

}  // namespace adafuse
