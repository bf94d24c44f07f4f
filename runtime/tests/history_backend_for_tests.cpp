#include "history_backend_for_tests.h"

#include <algorithm>
#include <thread>

#include "error.h"

namespace adafuse {
namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

HistoryBackendForTests::HistoryBackendForTests(const HistoryBackendOptions& o)
    : step_delay_(o.step_delay), per_token_cost_(o.per_token_cost) {
  info_.max_batch = o.max_batch;
  info_.max_seq = o.max_seq;
  info_.vocab = o.vocab;
  info_.in_flight = o.in_flight;
  info_.max_step_tokens = o.in_flight ? o.max_step_tokens : 0;
  info_.description = "history hash backend (tests only)";
  tokens_.resize(static_cast<size_t>(o.max_batch));
  hashes_.resize(static_cast<size_t>(o.max_batch));
}

uint64_t HistoryBackendForTests::extend(uint64_t hash, int64_t token) {
  uint64_t state = hash ^ (static_cast<uint64_t>(token) * 0xd6e8feb86659fd93ull);
  return splitmix64(state);
}

void HistoryBackendForTests::logits_of(uint64_t hash, int64_t vocab, float* out) {
  uint64_t state = hash;
  for (int64_t t = 0; t < vocab; ++t)
    out[t] = static_cast<float>(static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53 * 8.0 - 4.0);
}

std::vector<float> HistoryBackendForTests::logits_after(const std::vector<int64_t>& history, int64_t vocab) {
  uint64_t hash = kEmpty;
  for (int64_t t : history) hash = extend(hash, t);
  std::vector<float> out(static_cast<size_t>(vocab));
  logits_of(hash, vocab, out.data());
  return out;
}

std::vector<int64_t> HistoryBackendForTests::solo_tokens(const std::vector<int64_t>& prompt, const SequenceOptions& options,
                                                         int64_t vocab) {
  uint64_t hash = kEmpty;
  for (int64_t t : prompt) hash = extend(hash, t);
  Sampler sampler(options.sampling);
  std::vector<float> logits(static_cast<size_t>(vocab));
  std::vector<int64_t> out;
  while (out.size() < static_cast<size_t>(options.max_new_tokens)) {
    logits_of(hash, vocab, logits.data());
    const int64_t token = sampler.next(logits.data(), vocab);
    out.push_back(token);
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), token) != options.stop_ids.end()) break;
    hash = extend(hash, token);
  }
  return out;
}

std::vector<HistoryStepRecord> HistoryBackendForTests::steps() const {
  std::lock_guard<std::mutex> lock(record_mutex_);
  return steps_;
}

int64_t HistoryBackendForTests::step_count() const {
  std::lock_guard<std::mutex> lock(record_mutex_);
  return static_cast<int64_t>(steps_.size());
}

std::vector<int64_t> HistoryBackendForTests::history(int32_t slot) const {
  const size_t s = static_cast<size_t>(slot);
  std::vector<int64_t> out = tokens_.at(s);
  out.resize(static_cast<size_t>(slot_length(slot)));  // released or rewound positions are not held
  return out;
}

void HistoryBackendForTests::simulate_cost(int64_t tokens) const {
  const auto cost = step_delay_ + per_token_cost_ * tokens;
  if (cost.count() > 0) std::this_thread::sleep_for(cost);
}

void HistoryBackendForTests::maybe_fail() {
  if (++calls_ == fail_at_) fail(ADAFUSE_ERR_CUDA, "history backend: step " + std::to_string(calls_) + " failed (simulated)");
}

void HistoryBackendForTests::feed(int32_t slot, int32_t start, const int64_t* ids, int32_t count, bool all, float* logits) {
  auto& tokens = tokens_[static_cast<size_t>(slot)];
  auto& hashes = hashes_[static_cast<size_t>(slot)];
  // The base checked start <= slot_length(slot); what lies beyond start is overwritten (a rewind, or
  // a released slot's old sequence).
  if (static_cast<size_t>(start) > tokens.size())
    fail(ADAFUSE_ERR_INTERNAL, "history backend: slot " + std::to_string(slot) + " holds " + std::to_string(tokens.size()) +
                                   " tokens, step starts at " + std::to_string(start));
  tokens.resize(static_cast<size_t>(start));
  hashes.resize(static_cast<size_t>(start));
  const int64_t vocab = info_.vocab;
  for (int32_t i = 0; i < count; ++i) {
    const uint64_t before = hashes.empty() ? kEmpty : hashes.back();
    tokens.push_back(ids[i]);
    hashes.push_back(extend(before, ids[i]));
    if (all || i == count - 1) {
      logits_of(hashes.back(), vocab, logits);
      logits += vocab;
    }
  }
}

void HistoryBackendForTests::do_step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t*,
                                     float*) {
  HistoryStepRecord record;
  record.rows.assign(rows, rows + n_rows);
  for (int32_t r = 0; r < n_rows; ++r) record.tokens += rows[r].count;
  {
    std::lock_guard<std::mutex> lock(record_mutex_);
    steps_.push_back(record);
  }
  simulate_cost(record.tokens);
  maybe_fail();
  const int64_t vocab = info_.vocab;
  for (int32_t r = 0; r < n_rows; ++r) {
    const StepRow& row = rows[r];
    feed(row.slot, row.start, ids, row.count, row.all_logits, logits);
    ids += row.count;
    logits += (row.all_logits ? row.count : 1) * vocab;
  }
}

void HistoryBackendForTests::do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits,
                                        int32_t*, float*) {
  simulate_cost(static_cast<int64_t>(batch) * len);
  for (int32_t b = 0; b < batch; ++b) {
    feed(b, 0, ids + static_cast<size_t>(b) * static_cast<size_t>(len), len, all_positions, logits);
    logits += (all_positions ? len : 1) * info_.vocab;
  }
}

void HistoryBackendForTests::do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t*, float*) {
  simulate_cost(batch);
  maybe_fail();
  for (int32_t b = 0; b < batch; ++b)
    feed(b, static_cast<int32_t>(tokens_[static_cast<size_t>(b)].size()), ids + b, 1, false, logits + b * info_.vocab);
}

void HistoryBackendForTests::do_read_kv(int32_t, bool, float*) const {
  fail(ADAFUSE_ERR_INVALID_ARGUMENT, "the history backend has no KV cache");
}

}  // namespace adafuse
