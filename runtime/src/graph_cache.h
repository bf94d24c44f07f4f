// The cache policy of captured decode steps (CUDA graphs), apart from CUDA so the CPU tests drive it.
// A captured step replays only with the same shapes and addresses, so an entry is keyed by batch,
// a length and KV-cache slot (the TensorRT backend binds its whole cache, so the length is max_seq and one
// key serves every decode step of a batch size and buffer; the lengths per row are data). The cache holds at most
// `capacity` entries and drops the least recently used one (destroying its graph) to make room.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <tuple>
#include <utility>

namespace adafuse {

template <typename Exec>  // cudaGraphExec_t in the TensorRT backend; a null Exec means "not captured"
class GraphCache {
 public:
  using Key = std::tuple<int32_t, int32_t, int>;  // batch, bound cache length, cache slot
  struct Entry {
    int seen = 0;  // plain runs so far: the second one is captured
    Exec exec{};
  };

  GraphCache(size_t capacity, std::function<void(Exec)> destroy) : capacity_(capacity), destroy_(std::move(destroy)) {}
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;
  ~GraphCache() { clear(); }

  // The entry of key, now the most recently used; a new one when absent, after dropping the least
  // recently used entry if the cache is full. The reference stays valid until that entry is dropped.
  Entry& touch(const Key& key) {
    auto found = index_.find(key);
    if (found != index_.end()) {
      order_.splice(order_.begin(), order_, found->second);
      return found->second->second;
    }
    if (capacity_ == 0) {
      scratch_ = Entry{};  // nothing may be kept: an entry that is never captured
      return scratch_;
    }
    if (order_.size() >= capacity_) {
      auto& [oldest_key, oldest] = order_.back();
      if (oldest.exec) destroy_(oldest.exec);
      index_.erase(oldest_key);
      order_.pop_back();
    }
    order_.emplace_front(key, Entry{});
    index_.emplace(key, order_.begin());
    return order_.front().second;
  }

  bool contains(const Key& key) const { return index_.count(key) != 0; }
  size_t size() const { return order_.size(); }
  size_t capacity() const { return capacity_; }

  void clear() {
    for (auto& [key, entry] : order_)
      if (entry.exec) destroy_(entry.exec);
    order_.clear();
    index_.clear();
  }

 private:
  size_t capacity_;
  std::function<void(Exec)> destroy_;
  std::list<std::pair<Key, Entry>> order_;  // most recently used first
  std::map<Key, typename std::list<std::pair<Key, Entry>>::iterator> index_;
  Entry scratch_;
};

}  // namespace adafuse
