// The captured-decode-step cache (graph_cache.h): bounded, least recently used entry dropped first,
// every captured graph destroyed exactly once (on eviction or with the cache).
#include <algorithm>
#include <vector>

#include "graph_cache.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

using Cache = GraphCache<int>;  // an int stands for a cudaGraphExec_t; 0 is "not captured"

TEST(GraphCache, KeepsAtMostItsCapacityAndDropsTheLeastRecentlyUsed) {
  std::vector<int> destroyed;
  Cache cache(2, [&](int exec) { destroyed.push_back(exec); });
  cache.touch({1, 10, 0}).exec = 101;
  cache.touch({1, 11, 1}).exec = 102;
  EXPECT_EQ(cache.touch({1, 10, 0}).exec, 101);  // a hit: now the most recently used
  cache.touch({1, 12, 0}).exec = 103;           // full: {1, 11, 1} is the least recently used
  EXPECT_EQ(destroyed, std::vector<int>{102});
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_TRUE(cache.contains({1, 10, 0}));
  EXPECT_FALSE(cache.contains({1, 11, 1}));
  EXPECT_TRUE(cache.contains({1, 12, 0}));
  // A dropped key comes back as a new, uncaptured entry that must be seen again before capture.
  Cache::Entry& again = cache.touch({1, 11, 1});
  EXPECT_EQ(again.exec, 0);
  EXPECT_EQ(again.seen, 0);
  EXPECT_EQ(destroyed, (std::vector<int>{102, 101}));
}

TEST(GraphCache, UncapturedEntriesAreDroppedWithoutDestroying) {
  std::vector<int> destroyed;
  Cache cache(1, [&](int exec) { destroyed.push_back(exec); });
  cache.touch({2, 5, 0}).seen = 1;
  cache.touch({2, 6, 1});
  EXPECT_TRUE(destroyed.empty());
  EXPECT_EQ(cache.size(), 1u);
}

TEST(GraphCache, DestroysWhatItHoldsWhenClearedOrDestroyed) {
  std::vector<int> destroyed;
  {
    Cache cache(8, [&](int exec) { destroyed.push_back(exec); });
    for (int p = 0; p < 5; ++p) cache.touch({1, p, p % 2}).exec = p == 2 ? 0 : 200 + p;
    cache.clear();
    EXPECT_EQ(cache.size(), 0u);
    EXPECT_EQ(destroyed.size(), 4u);
    cache.touch({4, 1, 0}).exec = 300;
  }
  std::sort(destroyed.begin(), destroyed.end());
  EXPECT_EQ(destroyed, (std::vector<int>{200, 201, 203, 204, 300}));
}

TEST(GraphCache, ALongGenerationStaysWithinTheBound) {
  // One generation touches a new (batch, past, slot) per token: 10000 steps through a cache of 64.
  int live = 0, destroyed = 0;
  {
    Cache cache(64, [&](int) { --live, ++destroyed; });
    for (int past = 0; past < 10000; ++past) {
      Cache::Entry& e = cache.touch({8, past, past % 2});
      e.exec = past + 1;
      ++live;
      ASSERT_LE(cache.size(), 64u);
    }
    EXPECT_EQ(live, 64);
  }
  EXPECT_EQ(live, 0);
  EXPECT_EQ(destroyed, 10000);
}

TEST(GraphCache, CapacityZeroKeepsNothing) {
  int destroyed = 0;
  Cache cache(0, [&](int) { ++destroyed; });
  Cache::Entry& e = cache.touch({1, 1, 0});
  EXPECT_EQ(++e.seen, 1);
  EXPECT_EQ(cache.touch({1, 1, 0}).seen, 0);  // never reaches the second sight, so never captured
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_EQ(destroyed, 0);
}

}  // namespace
}  // namespace adafuse::testing
