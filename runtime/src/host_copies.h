// The copies that bring consecutive pieces of one device buffer to their host destinations, merged where a
// piece's destination directly follows the previous piece's: a decode batch's [batch, vocab] logits or
// [batch, top_k] routes go in one copy instead of one per row (each a synchronous copy to pageable memory).
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace adafuse {

struct HostCopy {
  void* dest;
  size_t offset;  // into the device buffer
  size_t bytes;
};

// pieces[i] = (its host destination, or nullptr when it is not wanted; its bytes); piece i starts in the device
// buffer where piece i - 1 ends.
inline std::vector<HostCopy> merge_host_copies(const std::vector<std::pair<void*, size_t>>& pieces) {
  std::vector<HostCopy> out;
  size_t offset = 0;
  for (const auto& [dest, bytes] : pieces) {
    if (dest != nullptr && bytes > 0) {
      HostCopy* last = out.empty() ? nullptr : &out.back();
      if (last != nullptr && last->offset + last->bytes == offset &&
          static_cast<char*>(last->dest) + last->bytes == static_cast<char*>(dest))
        last->bytes += bytes;
      else
        out.push_back({dest, offset, bytes});
    }
    offset += bytes;
  }
  return out;
}

}  // namespace adafuse
