// The routing table: lookups return the table's rows; bad tables and ids are refused.
// (tests/test_runtime.py also compares lookups with `adafuse-export export-routes` and the reference pre-gate.)
#include "routing.h"
#include "test_util.h"

namespace adafuse::testing {
namespace {

TEST(RoutingTable, LooksUpRows) {
  TempDir dir;
  const std::vector<int32_t> ids = {0, 1, 2, 3, 1, 0, 3, 2, 2, 0};  // [5, 2]
  const std::vector<float> gates = {0.9f, 0.1f, 0.6f, 0.4f, 0.5f, 0.5f, 0.7f, 0.3f, 0.8f, 0.2f};
  write_file(dir / "r.safetensors", safetensors_bytes({{"gates", "F32", {5, 2}, bytes_of(gates)}, {"expert_ids", "I32", {5, 2}, bytes_of(ids)}}));
  RoutingTable table(dir / "r.safetensors");
  EXPECT_EQ(table.vocab(), 5);
  EXPECT_EQ(table.top_k(), 2);
  const std::vector<int64_t> tokens = {4, 0, 2, 2};
  std::vector<int32_t> got_ids(8);
  std::vector<float> got_gates(8);
  table.lookup(tokens.data(), tokens.size(), got_ids.data(), got_gates.data());
  EXPECT_EQ(got_ids, (std::vector<int32_t>{2, 0, 0, 1, 1, 0, 1, 0}));
  EXPECT_EQ(got_gates, (std::vector<float>{0.8f, 0.2f, 0.9f, 0.1f, 0.5f, 0.5f, 0.5f, 0.5f}));
  const int64_t bad = 5;
  expect_error([&] { table.lookup(&bad, 1, got_ids.data(), got_gates.data()); }, ADAFUSE_ERR_INVALID_ARGUMENT,
               "token id 5 is out of the routing table's vocabulary [0, 5)");
}

TEST(RoutingTable, RefusesMismatchedOrMissingTensors) {
  TempDir dir;
  const fs::path p = dir / "r.safetensors";
  write_file(p, safetensors_bytes({{"expert_ids", "I32", {2, 2}, std::string(16, '\0')}, {"gates", "F32", {2, 1}, std::string(8, '\0')}}));
  expect_error([&] { RoutingTable t(p); }, ADAFUSE_ERR_FILE,
               p.string() + ": expert_ids [2, 2] and gates [2, 1] must have one equal, non-empty [vocab, k] shape");
  write_file(p, safetensors_bytes({{"expert_ids", "I64", {2, 2}, std::string(32, '\0')}, {"gates", "F32", {2, 2}, std::string(16, '\0')}}));
  expect_error([&] { RoutingTable t(p); }, ADAFUSE_ERR_FILE, p.string() + ": tensor 'expert_ids' is I64 of rank 2, expected I32 of rank 2");
  write_file(p, safetensors_bytes({{"gates", "F32", {2, 2}, std::string(16, '\0')}}));
  expect_error([&] { RoutingTable t(p); }, ADAFUSE_ERR_FILE, p.string() + ": tensor 'expert_ids' not found");
}

}  // namespace
}  // namespace adafuse::testing
