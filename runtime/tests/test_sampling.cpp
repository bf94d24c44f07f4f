// Sampling: greedy is argmax; a seed fixes the tokens; temperature/top-k/top-p draws follow the
// distribution computed here independently (float64 softmax over hand-sorted logits), checked by
// a chi-square test; tokens outside top-k / top-p are never drawn.
#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <tuple>

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

// A large vocabulary: the kept set and its probabilities against a reference that sorts the whole vocabulary
// (stable by id) and renormalises in float64, for top-k by partial selection, top-p by growing candidate
// sets (a flat distribution whose nucleus holds thousands of tokens) and ties.
std::vector<double> by_full_sort(const std::vector<float>& l, double t, size_t k, double top_p) {
  std::vector<size_t> order(l.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return l[a] > l[b]; });
  const size_t keep = k ? std::min(k, l.size()) : l.size();
  std::vector<double> w(keep);
  double z = 0.0;
  for (size_t i = 0; i < keep; ++i) z += w[i] = std::exp((static_cast<double>(l[order[i]]) - l[order[0]]) / t);
  size_t n = keep;
  if (top_p < 1.0) {
    double cum = 0.0;
    for (n = 0; n < keep;) {
      cum += w[n++] / z;
      if (cum >= top_p) break;
    }
  }
  double zn = 0.0;
  for (size_t i = 0; i < n; ++i) zn += w[i];
  std::vector<double> p(l.size(), 0.0);
  for (size_t i = 0; i < n; ++i) p[order[i]] = w[i] / zn;
  return p;
}

TEST(Sampling, LargeVocabularyKeepsWhatAFullSortKeeps) {
  std::mt19937 gen(3);
  std::normal_distribution<float> normal;
  for (float spread : {0.05f, 1.0f, 4.0f}) {  // flat (a nucleus of thousands), moderate, peaked
    std::vector<float> l(20000);
    for (auto& x : l) x = normal(gen) * spread;
    for (size_t i = 0; i < 200; ++i) l[i * 97] = l[5];  // ties across the cut points
    for (auto [t, k, p] : std::vector<std::tuple<float, int32_t, float>>{
             {1.0f, 0, 1.0f}, {0.7f, 50, 1.0f}, {1.0f, 0, 0.9f}, {1.3f, 0, 0.5f}, {0.8f, 4000, 0.95f}, {1.0f, 20000, 0.99f}}) {
      const std::vector<double> got = sampling_distribution(options(t, k, p), l.data(), static_cast<int64_t>(l.size()));
      const std::vector<double> want = by_full_sort(l, t, static_cast<size_t>(k), p);
      size_t kept_got = 0, kept_want = 0;
      for (size_t i = 0; i < l.size(); ++i) {
        kept_got += got[i] > 0.0;
        kept_want += want[i] > 0.0;
        ASSERT_NEAR(got[i], want[i], 1e-12) << "spread " << spread << " t " << t << " k " << k << " p " << p << " token " << i;
      }
      EXPECT_EQ(kept_got, kept_want);
    }
  }
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
