// The pre-gate as an exported routing table: expert_ids int32 [vocab, k] and gates float32 [vocab, k]
// (`adafuse-export export-routes`, and routing.routes_file of an engine manifest).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace adafuse {

class RoutingTable {
 public:
  // num_experts > 0: every expert id must lie in [0, num_experts) (the manifest's routing.num_experts);
  // 0: ids are only checked to be >= 0 (a table read without its engine).
  explicit RoutingTable(const std::filesystem::path& path, int64_t num_experts = 0);
  int64_t vocab() const { return vocab_; }
  int32_t top_k() const { return top_k_; }
  // Row-major [vocab, k] tables (the device copy is uploaded from these).
  const std::vector<int32_t>& expert_ids() const { return expert_ids_; }
  const std::vector<float>& gates() const { return gates_; }
  // n ids -> n * k expert ids and gates; an id outside [0, vocab) is refused.
  void lookup(const int64_t* ids, size_t n, int32_t* expert_ids, float* gates) const;

 private:
  int64_t vocab_ = 0;
  int32_t top_k_ = 0;
  std::vector<int32_t> expert_ids_;
  std::vector<float> gates_;
};

}  // namespace adafuse
