#include "routing.h"

#include <cmath>
#include <cstring>

#include "error.h"
#include "safetensors.h"

namespace adafuse {
namespace {
constexpr int64_t kMaxTopK = 1024;  // far above any router's k; keeps k an int32 and rows small
}  // namespace

RoutingTable::RoutingTable(const std::filesystem::path& path, int64_t num_experts) {
  SafetensorsFile file(path);
  const SafeTensor& ids = file.get("expert_ids", "I32", 2);
  const SafeTensor& gates = file.get("gates", "F32", 2);
  if (ids.shape != gates.shape || ids.shape[1] < 1 || ids.shape[0] < 1)
    fail(ADAFUSE_ERR_FILE, path.string() + ": expert_ids [" + std::to_string(ids.shape[0]) + ", " +
                               std::to_string(ids.shape[1]) + "] and gates [" + std::to_string(gates.shape[0]) + ", " +
                               std::to_string(gates.shape[1]) + "] must have one equal, non-empty [vocab, k] shape");
  if (ids.shape[1] > kMaxTopK)
    fail(ADAFUSE_ERR_FILE, path.string() + ": expert_ids [" + std::to_string(ids.shape[0]) + ", " + std::to_string(ids.shape[1]) +
                               "]: top-k " + std::to_string(ids.shape[1]) + " exceeds " + std::to_string(kMaxTopK));
  vocab_ = ids.shape[0];
  top_k_ = static_cast<int32_t>(ids.shape[1]);
  expert_ids_.resize(static_cast<size_t>(ids.numel()));
  gates_.resize(static_cast<size_t>(gates.numel()));
  std::memcpy(expert_ids_.data(), ids.data.data(), ids.data.size());
  std::memcpy(gates_.data(), gates.data.data(), gates.data.size());
  const std::string where = path.string() + ": routing table 'expert_ids'";
  size_t bad = 0;
  int32_t first = 0;
  for (int32_t e : expert_ids_)
    if (e < 0 || (num_experts > 0 && e >= num_experts)) {
      if (bad++ == 0) first = e;
    }
  if (bad > 0 && num_experts > 0)  // plugin_ops.check_expert_ids' wording
    fail(ADAFUSE_ERR_FILE, where + ": expert id " + std::to_string(first) + " is out of range [0, " + std::to_string(num_experts) +
                               ") (" + std::to_string(bad) + " of " + std::to_string(expert_ids_.size()) +
                               " ids); the adapter kernels would read outside the expert weights");
  if (bad > 0)
    fail(ADAFUSE_ERR_FILE, path.string() + ": expert_ids holds " + std::to_string(first) + ", expected ids >= 0");
  // runners/base.py read_routes' checks and wording: gates are the pre-gate's softmax weights.
  size_t non_finite = 0, outside = 0;
  for (float g : gates_) {
    if (!std::isfinite(g)) ++non_finite;
    else if (g < 0.0f || g > 1.0f) ++outside;
  }
  if (non_finite > 0) fail(ADAFUSE_ERR_FILE, path.string() + ": 'gates' holds NaN/Inf values, expected finite weights");
  if (outside > 0)
    fail(ADAFUSE_ERR_FILE, path.string() + ": 'gates' holds " + std::to_string(outside) + " of " + std::to_string(gates_.size()) +
                               " weights outside [0, 1]; a routing table holds the pre-gate's softmax weights");
}

void RoutingTable::lookup(const int64_t* ids, size_t n, int32_t* expert_ids, float* gates) const {
  const size_t k = static_cast<size_t>(top_k_);
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, "token id " + std::to_string(ids[i]) + " is out of the routing table's vocabulary [0, " +
                                             std::to_string(vocab_) + ")");
    const size_t row = static_cast<size_t>(ids[i]) * k;
    std::memcpy(expert_ids + i * k, expert_ids_.data() + row, k * sizeof(int32_t));
    std::memcpy(gates + i * k, gates_.data() + row, k * sizeof(float));
  }
}

}  // namespace adafuse
