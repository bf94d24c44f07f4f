// Sampling: greedy is argmax; a seed fixes the tokens; temperature/top-k/top-p draws follow the
// distribution computed here independently (float64 softmax over hand-sorted logits), checked by
// a chi-square test; tokens outside top-k / top-p are never drawn.
#include <cmath>
#include <map>

#include "sampling.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

// Sorted descending on purpose: the expected distributions below follow from a prefix.
const std::vector<float> kLogits = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f};

adafuse_sampling options(float temperature, int32_t top_k, float top_p, uint64_t seed = 7) {
  return adafuse_sampling{temperature, top_k, top_p, seed};
}

// softmax(l / t) over the first `keep` logits, zeros after.
std::vector<double> expected(double t, size_t keep) {
  std::vector<double> p(kLogits.size(), 0.0);
  double z = 0.0;
  for (size_t i = 0; i < keep; ++i) z += std::exp(kLogits[i] / t);
  for (size_t i = 0; i < keep; ++i) p[i] = std::exp(kLogits[i] / t) / z;
  return p;
}

void check_draws(const adafuse_sampling& o, const std::vector<double>& want) {
  Sampler s(o);
  const int n = 40000;
  std::vector<int> counts(kLogits.size(), 0);
  for (int i = 0; i < n; ++i) ++counts[static_cast<size_t>(s.next(kLogits.data(), 5))];
  double chi2 = 0.0;
  int dof = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] == 0.0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " lies outside top-k/top-p";
      continue;
    }
    const double e = n * want[i];
    chi2 += (counts[i] - e) * (counts[i] - e) / e;
    ++dof;
  }
  // 99.99th percentile of chi-square with <= 4 degrees of freedom is 23.5.
  EXPECT_LT(chi2, 23.5) << "dof " << dof;
  const std::vector<double> dist = sampling_distribution(o, kLogits.data(), 5);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(dist[i], want[i], 1e-12) << i;
}

TEST(Sampling, GreedyIsArgmaxWithTheFirstMaximum) {
  Sampler s(options(0.0f, 0, 1.0f));
  const std::vector<float> tie = {0.0f, 3.0f, 3.0f, -1.0f};
  EXPECT_EQ(s.next(tie.data(), 4), 1);
  const std::vector<float> last = {0.0f, 1.0f, 2.0f, 5.0f};
  EXPECT_EQ(s.next(last.data(), 4), 3);
  Sampler k1(options(1.0f, 1, 1.0f));  // top-k 1 is greedy too
  EXPECT_EQ(k1.next(last.data(), 4), 3);
}

TEST(Sampling, TemperatureFollowsTheSoftmax) { check_draws(options(0.5f, 0, 1.0f), expected(0.5, 5)); }
TEST(Sampling, TopKKeepsTheKMostLikely) { check_draws(options(1.0f, 3, 1.0f), expected(1.0, 3)); }

TEST(Sampling, TopPKeepsTheSmallestSetReachingP) {
  // Full softmax at t=1: 0.563, 0.207, 0.126, 0.076, 0.028 (cumulative 0.563, 0.770, 0.896, ...).
  const std::vector<double> full = expected(1.0, 5);
  ASSERT_LT(full[0] + full[1], 0.8);
  ASSERT_GE(full[0] + full[1] + full[2], 0.8);
  check_draws(options(1.0f, 0, 0.8f), expected(1.0, 3));
  check_draws(options(1.0f, 0, 0.5f), expected(1.0, 1));
}

TEST(Sampling, TopKThenTopP) { check_draws(options(2.0f, 4, 0.9f), [] {
  // t=2 over the top 4, then the smallest prefix reaching 0.9 of that renormalised set.
  std::vector<double> p = expected(2.0, 4);
  double cum = 0.0;
  size_t keep = 0;
  while (cum < 0.9) cum += p[keep++];
  return expected(2.0, keep);
}()); }

TEST(Sampling, ASeedFixesTheTokens) {
  std::vector<float> logits(50);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(static_cast<float>(i)) * 2.0f;
  auto draw = [&](uint64_t seed) {
    Sampler s(options(1.0f, 20, 0.95f, seed));
    std::vector<int64_t> ids;
    for (int i = 0; i < 64; ++i) ids.push_back(s.next(logits.data(), 50));
    return ids;
  };
  EXPECT_EQ(draw(42), draw(42));
  EXPECT_NE(draw(42), draw(43));
}

TEST(Sampling, RefusesBadOptionsAndLogits) {
  expect_error([] { Sampler s(options(-1.0f, 0, 1.0f)); }, ADAFUSE_ERR_INVALID_ARGUMENT, "sampling temperature must be >= 0, found -1.000000");
  expect_error([] { Sampler s(options(1.0f, -2, 1.0f)); }, ADAFUSE_ERR_INVALID_ARGUMENT, "sampling top_k must be >= 0 (0: off), found -2");
  expect_error([] { Sampler s(options(1.0f, 0, 0.0f)); }, ADAFUSE_ERR_INVALID_ARGUMENT, "sampling top_p must be in (0, 1] (1: off), found 0.000000");
  Sampler s(options(1.0f, 0, 1.0f));
  const std::vector<float> nan = {0.0f, std::nanf("")};
  expect_error([&] { s.next(nan.data(), 2); }, ADAFUSE_ERR_INVALID_ARGUMENT, "logits hold NaN at token 1");
}

}  // namespace
}  // namespace adafuse::testing
