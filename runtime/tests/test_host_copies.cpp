// merge_host_copies (host_copies.h): the native backend's downloads of logits and routes, one copy per run of
// host destinations that follow one another, each from the right place in the device buffer.
#include "host_copies.h"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <vector>

namespace {

using adafuse::HostCopy;
using adafuse::merge_host_copies;

// Carries the copies out on host memory standing in for the device buffer: what each destination receives.
void perform(const std::vector<HostCopy>& copies, const std::vector<char>& device) {
  for (const HostCopy& c : copies) std::memcpy(c.dest, device.data() + c.offset, c.bytes);
}

TEST(HostCopies, ContiguousDestinationsMergeIntoOneCopy) {
  std::vector<char> host(4 * 8), device(4 * 8);
  std::iota(device.begin(), device.end(), 0);
  std::vector<std::pair<void*, size_t>> pieces;
  for (int r = 0; r < 4; ++r) pieces.emplace_back(host.data() + r * 8, 8);
  const auto copies = merge_host_copies(pieces);
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].dest, host.data());
  EXPECT_EQ(copies[0].offset, 0u);
  EXPECT_EQ(copies[0].bytes, 32u);
  perform(copies, device);
  EXPECT_EQ(host, device);
}

TEST(HostCopies, GapsSkippedPiecesAndOtherOrdersSplit) {
  std::vector<char> a(12, 'x'), b(8, 'x'), device(4 + 4 + 4 + 8 + 4);
  std::iota(device.begin(), device.end(), 1);
  // piece 0 -> a[0..4), piece 1 -> a[4..8) (merged), piece 2 not wanted, piece 3 -> b (8 bytes), piece 4 -> a[8..12)
  // (follows piece 1's destination but not its device bytes: a copy of its own)
  const std::vector<std::pair<void*, size_t>> pieces = {
      {a.data(), 4}, {a.data() + 4, 4}, {nullptr, 4}, {b.data(), 8}, {a.data() + 8, 4}};
  const auto copies = merge_host_copies(pieces);
  ASSERT_EQ(copies.size(), 3u);
  EXPECT_EQ(copies[0].offset, 0u);
  EXPECT_EQ(copies[0].bytes, 8u);
  EXPECT_EQ(copies[1].dest, b.data());
  EXPECT_EQ(copies[1].offset, 12u);
  EXPECT_EQ(copies[2].dest, a.data() + 8);
  EXPECT_EQ(copies[2].offset, 20u);
  perform(copies, device);
  EXPECT_EQ(std::vector<char>(a.begin(), a.begin() + 8), std::vector<char>(device.begin(), device.begin() + 8));
  EXPECT_EQ(std::vector<char>(a.begin() + 8, a.end()), std::vector<char>(device.begin() + 20, device.end()));
  EXPECT_EQ(b, std::vector<char>(device.begin() + 12, device.begin() + 20));
}

TEST(HostCopies, DestinationsInReverseOrderAreNotMerged) {
  std::vector<char> host(8);
  const auto copies = merge_host_copies({{host.data() + 4, 4}, {host.data(), 4}});
  ASSERT_EQ(copies.size(), 2u);
  EXPECT_EQ(copies[1].offset, 4u);
}

TEST(HostCopies, NothingWantedNothingCopied) {
  EXPECT_TRUE(merge_host_copies({{nullptr, 16}, {nullptr, 0}}).empty());
  EXPECT_TRUE(merge_host_copies({}).empty());
}

}  // namespace
