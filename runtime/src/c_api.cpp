// The C API: catches every exception at the boundary and turns it into a status and a message.
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "adafuse/runtime.h"
#include "engine_handle.h"
#include "batcher.h"
#include "error.h"
#include "generation.h"
#include "handles.h"
#include "manifest.h"
#include "open_backend.h"
#include "routing.h"
#include "sampling.h"

#ifndef ADAFUSE_RUNTIME_VERSION
#error "ADAFUSE_RUNTIME_VERSION must be defined by the build"
#endif

struct adafuse_manifest {
  adafuse::Manifest manifest;
  std::string text;
};
struct adafuse_routes {
  adafuse::RoutingTable table;
};
struct adafuse_sampler {
  adafuse::Sampler sampler;
};

namespace {

thread_local std::string last_error;

template <typename F>
adafuse_status guarded(F&& body) {
  try {
    body();
    last_error.clear();
    return ADAFUSE_OK;
  } catch (const adafuse::Error& e) {
    last_error = e.what();
    return e.status();
  } catch (const std::bad_alloc&) {
    last_error = "out of host memory";
    return ADAFUSE_ERR_INTERNAL;
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
    return ADAFUSE_ERR_INTERNAL;
  }
}

void need(const void* pointer, const char* name) {
  if (pointer == nullptr) adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string(name) + ": NULL pointer");
}

using adafuse::handles::Kind;
// Every handle argument is checked against the registry (handles.h) before it is dereferenced.
void need(const adafuse_routes* h, const char* name) { adafuse::handles::check(h, Kind::routes, name); }
void need(const adafuse_sampler* h, const char* name) { adafuse::handles::check(h, Kind::sampler, name); }
void need(const adafuse_engine* h, const char* name) { adafuse::handles::check(h, Kind::engine, name); }

// Hands a new handle out: registered first, so that a failure leaves nothing behind.
template <typename T>
T* hand_out(std::unique_ptr<T> handle, Kind kind) {
  adafuse::handles::add(handle.get(), kind);
  return handle.release();
}

template <typename T>
void free_handle(T* handle, Kind kind) {
  if (adafuse::handles::remove(handle, kind)) delete handle;  // unknown or freed pointers are ignored
}

// Sequence i's options from the C API's (seed + i), after the options' own pointers are checked.
adafuse::SequenceOptions sequence_options(const adafuse_generate_options& o, int32_t i) {
  adafuse::SequenceOptions seq;
  seq.sampling = o.sampling;
  seq.sampling.seed = o.sampling.seed + static_cast<uint64_t>(i);
  seq.max_new_tokens = o.max_new_tokens;
  seq.stop_ids.assign(o.stop_ids, o.stop_ids + o.num_stop_ids);
  return seq;
}

void check_generate_options(const adafuse_generate_options* options) {
  need(options, "options");
  if (options->num_stop_ids > 0) need(options->stop_ids, "options.stop_ids");
  if (options->num_stop_ids > 1u << 20)
    adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "num_stop_ids " + std::to_string(options->num_stop_ids) + " exceeds 1048576");
}

void write_tokens(const std::vector<int64_t>& tokens, size_t width, int64_t* out_tokens, int32_t* out_length) {
  for (size_t j = 0; j < width; ++j) out_tokens[j] = j < tokens.size() ? tokens[j] : -1;
  *out_length = static_cast<int32_t>(tokens.size());
}

}  // namespace

extern "C" {

const char* adafuse_last_error(void) { return last_error.c_str(); }
const char* adafuse_version(void) { return ADAFUSE_RUNTIME_VERSION; }
const char* adafuse_plugin_version(void) { return adafuse::kPluginVersion; }

adafuse_status adafuse_manifest_open(const char* engine_path, int check_files, adafuse_manifest** out) {
  return guarded([&] {
    need(engine_path, "engine_path");
    need(out, "out");
    auto m = std::make_unique<adafuse_manifest>();
    m->manifest = adafuse::verify_engine(engine_path, check_files != 0);
    m->text = m->manifest.json.dump(2);
    *out = hand_out(std::move(m), Kind::manifest);
  });
}
const char* adafuse_manifest_json(const adafuse_manifest* manifest) {
  return adafuse::handles::valid(manifest, Kind::manifest) ? manifest->text.c_str() : "";
}
void adafuse_manifest_free(adafuse_manifest* manifest) { free_handle(manifest, Kind::manifest); }

adafuse_status adafuse_routes_open(const char* path, adafuse_routes** out) {
  return guarded([&] {
    need(path, "path");
    need(out, "out");
    *out = hand_out(std::make_unique<adafuse_routes>(adafuse_routes{adafuse::RoutingTable(path)}), Kind::routes);
  });
}
void adafuse_routes_shape(const adafuse_routes* routes, int64_t* vocab, int32_t* top_k) {
  const bool ok = adafuse::handles::valid(routes, Kind::routes);
  if (vocab) *vocab = ok ? routes->table.vocab() : 0;
  if (top_k) *top_k = ok ? routes->table.top_k() : 0;
}
adafuse_status adafuse_routes_lookup(const adafuse_routes* routes, const int64_t* ids, size_t n, int32_t* expert_ids,
                                     float* gates) {
  return guarded([&] {
    need(routes, "routes");
    need(ids, "ids");
    need(expert_ids, "expert_ids");
    need(gates, "gates");
    routes->table.lookup(ids, n, expert_ids, gates);
  });
}
void adafuse_routes_free(adafuse_routes* routes) { free_handle(routes, Kind::routes); }

adafuse_sampling adafuse_sampling_default(void) { return adafuse_sampling{0.0f, 0, 1.0f, 0}; }

adafuse_status adafuse_sampler_create(const adafuse_sampling* options, adafuse_sampler** out) {
  return guarded([&] {
    need(options, "options");
    need(out, "out");
    *out = hand_out(std::make_unique<adafuse_sampler>(adafuse_sampler{adafuse::Sampler(*options)}), Kind::sampler);
  });
}
adafuse_status adafuse_sampler_next(adafuse_sampler* sampler, const float* logits, int64_t vocab, int64_t* token) {
  return guarded([&] {
    need(sampler, "sampler");
    need(logits, "logits");
    need(token, "token");
    *token = sampler->sampler.next(logits, vocab);
  });
}
void adafuse_sampler_free(adafuse_sampler* sampler) { free_handle(sampler, Kind::sampler); }

adafuse_open_options adafuse_open_options_default(void) {
  return adafuse_open_options{nullptr, nullptr, nullptr, 0, 1, nullptr};
}

adafuse_status adafuse_engine_open(const adafuse_open_options* options, adafuse_engine** out) {
  return guarded([&] {
    need(options, "options");
    need(options->engine_path, "options.engine_path");
    need(out, "out");
    auto engine = std::make_unique<adafuse_engine>();
    engine->backend = adafuse::open_backend(*options);
    *out = hand_out(std::move(engine), Kind::engine);
  });
}
void adafuse_engine_limits(const adafuse_engine* engine, int32_t* max_batch, int32_t* max_seq, int64_t* vocab) {
  const adafuse::BackendInfo none;
  const adafuse::BackendInfo& info = adafuse::handles::valid(engine, Kind::engine) ? engine->backend->info() : none;
  if (max_batch) *max_batch = info.max_batch;
  if (max_seq) *max_seq = info.max_seq;
  if (vocab) *vocab = info.vocab;
}
void adafuse_engine_free(adafuse_engine* engine) { free_handle(engine, Kind::engine); }

adafuse_generate_options adafuse_generate_options_default(void) {
  return adafuse_generate_options{adafuse_sampling_default(), 16, nullptr, 0, nullptr, nullptr};
}

adafuse_status adafuse_generate(adafuse_engine* engine, const int64_t* prompt_ids, int32_t batch, int32_t prompt_len,
                                const adafuse_generate_options* options, int64_t* out_tokens, int32_t* out_lengths) {
  return guarded([&] {
    need(engine, "engine");
    need(prompt_ids, "prompt_ids");
    check_generate_options(options);
    need(out_tokens, "out_tokens");
    need(out_lengths, "out_lengths");
    if (batch < 1 || prompt_len < 1)
      adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "batch and prompt_len must be >= 1, found " + std::to_string(batch) +
                                                      " and " + std::to_string(prompt_len));
    // Before copying batch x prompt_len ids out of the caller's buffer: the engine's own bounds.
    const adafuse::BackendInfo& info = engine->backend->info();
    if (batch > info.max_batch)
      adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "batch of " + std::to_string(batch) +
                                                      " sequences: the engine's profile takes 1 to " + std::to_string(info.max_batch));
    if (prompt_len > info.max_seq)
      adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt of " + std::to_string(prompt_len) +
                                                      " tokens is longer than the engine's profile (max_seq " +
                                                      std::to_string(info.max_seq) + ")");
    std::vector<std::vector<int64_t>> prompts;
    std::vector<adafuse::SequenceOptions> seq;
    for (int32_t i = 0; i < batch; ++i) {
      const int64_t* row = prompt_ids + static_cast<size_t>(i) * static_cast<size_t>(prompt_len);
      prompts.emplace_back(row, row + prompt_len);
      seq.push_back(sequence_options(*options, i));
    }
    adafuse::Generation gen(*engine->backend, std::move(prompts), std::move(seq));
    adafuse::TokenCallback callback;
    if (options->on_token != nullptr)
      callback = [&](int32_t s, int64_t t) { return options->on_token(options->user, s, t) == 0; };
    while (gen.step(callback)) {
    }
    const size_t width = static_cast<size_t>(options->max_new_tokens);
    for (size_t i = 0; i < gen.size(); ++i) write_tokens(gen.tokens(i), width, out_tokens + i * width, out_lengths + i);
  });
}

adafuse_status adafuse_generate_many(adafuse_engine* engine, const int64_t* const* prompts, const int32_t* prompt_lens,
                                     int32_t n, const adafuse_generate_options* options, int64_t* out_tokens,
                                     int32_t* out_lengths) {
  return guarded([&] {
    need(engine, "engine");
    need(prompts, "prompts");
    need(prompt_lens, "prompt_lens");
    need(out_tokens, "out_tokens");
    need(out_lengths, "out_lengths");
    check_generate_options(options);
    if (n < 1 || n > (1 << 20)) adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "n must be in [1, 1048576], found " + std::to_string(n));
    const adafuse::BackendInfo& info = engine->backend->info();
    for (int32_t i = 0; i < n; ++i) {  // the engine's bounds before any prompt is copied
      need(prompts[i], ("prompts[" + std::to_string(i) + "]").c_str());
      if (prompt_lens[i] < 1 || prompt_lens[i] > info.max_seq)
        adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompt_lens[" + std::to_string(i) + "] = " + std::to_string(prompt_lens[i]) +
                                                        ": expected 1 to the engine's max_seq " + std::to_string(info.max_seq));
    }
    std::vector<std::vector<int64_t>> copied;
    for (int32_t i = 0; i < n; ++i) copied.emplace_back(prompts[i], prompts[i] + prompt_lens[i]);
    const size_t width = static_cast<size_t>(options->max_new_tokens);
    if (!info.in_flight) {
      for (int32_t i = 1; i < n; ++i)
        if (prompt_lens[i] != prompt_lens[0])
          adafuse::fail(ADAFUSE_ERR_UNSUPPORTED, "prompt " + std::to_string(i) + " has " + std::to_string(prompt_lens[i]) +
                                                     " tokens, prompt 0 has " + std::to_string(prompt_lens[0]) + ": " +
                                                     info.description + " runs equal-length batches only (no in-flight step)");
      if (n > info.max_batch)
        adafuse::fail(ADAFUSE_ERR_UNSUPPORTED, std::to_string(n) + " prompts: " + info.description +
                                                   " runs equal-length batches of at most " + std::to_string(info.max_batch));
    }
    std::vector<adafuse::SequenceOptions> seq;
    for (int32_t i = 0; i < n; ++i) {  // every prompt is checked before any runs
      seq.push_back(sequence_options(*options, i));
      const auto& p = copied[static_cast<size_t>(i)];
      adafuse::check_sequence(info, p.size(), seq.back());
      for (size_t j = 0; j < p.size(); ++j)
        if (p[j] < 0 || p[j] >= info.vocab)
          adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "prompts[" + std::to_string(i) + "][" + std::to_string(j) + "] = " +
                                                          std::to_string(p[j]) + " is out of the vocabulary [0, " +
                                                          std::to_string(info.vocab) + ")");
    }
    if (!info.in_flight) {
      adafuse::Generation gen(*engine->backend, std::move(copied), std::move(seq));
      adafuse::TokenCallback callback;
      if (options->on_token != nullptr)
        callback = [&](int32_t s, int64_t t) { return options->on_token(options->user, s, t) == 0; };
      while (gen.step(callback)) {
      }
      for (size_t i = 0; i < gen.size(); ++i) write_tokens(gen.tokens(i), width, out_tokens + i * width, out_lengths + i);
      return;
    }
    adafuse::InFlightBatcher batcher(*engine->backend);
    std::map<uint64_t, int32_t> sequence_of;
    int32_t next = 0, done = 0;
    while (done < n) {
      for (; next < n && batcher.free_slots() > 0; ++next) {
        adafuse::SequenceHooks hooks;
        if (options->on_token != nullptr)
          hooks.on_token = [options, i = next](int64_t t) { return options->on_token(options->user, i, t) == 0; };
        sequence_of[batcher.admit(std::move(copied[static_cast<size_t>(next)]), seq[static_cast<size_t>(next)], std::move(hooks))] = next;
      }
      for (auto& f : batcher.step()) {
        const int32_t i = sequence_of.at(f.id);
        if (!f.error.empty()) adafuse::fail(f.status, "sequence " + std::to_string(i) + ": " + f.error);
        write_tokens(f.tokens, width, out_tokens + static_cast<size_t>(i) * width, out_lengths + i);
        ++done;
      }
    }
  });
}

adafuse_status adafuse_prefill(adafuse_engine* engine, const int64_t* ids, int32_t batch, int32_t len, float* logits,
                               int32_t* expert_ids, float* gates) {
  return guarded([&] {
    need(engine, "engine");
    engine->backend->prefill(ids, batch, len, true, logits, expert_ids, gates);
  });
}
adafuse_status adafuse_decode(adafuse_engine* engine, const int64_t* ids, int32_t batch, float* logits,
                              int32_t* expert_ids, float* gates) {
  return guarded([&] {
    need(engine, "engine");
    engine->backend->decode(ids, batch, logits, expert_ids, gates);
  });
}
adafuse_status adafuse_step(adafuse_engine* engine, const int64_t* ids, const adafuse_step_row* rows, int32_t n_rows,
                            float* logits, int32_t* expert_ids, float* gates) {
  return guarded([&] {
    need(engine, "engine");
    need(rows, "rows");
    const int32_t max_rows = engine->backend->info().max_batch;
    if (n_rows < 1 || n_rows > max_rows)  // before reading the caller's array
      adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "step of " + std::to_string(n_rows) + " sequences: the engine takes 1 to " +
                                                      std::to_string(max_rows));
    std::vector<adafuse::StepRow> step(static_cast<size_t>(n_rows));
    for (int32_t r = 0; r < n_rows; ++r)
      step[static_cast<size_t>(r)] = adafuse::StepRow{rows[r].slot, rows[r].start, rows[r].count, rows[r].all_logits != 0};
    engine->backend->step(ids, step.data(), n_rows, logits, expert_ids, gates);
  });
}
void adafuse_step_limits(const adafuse_engine* engine, int32_t* in_flight, int32_t* max_step_tokens) {
  const adafuse::BackendInfo none;
  const adafuse::BackendInfo& info = adafuse::handles::valid(engine, Kind::engine) ? engine->backend->info() : none;
  if (in_flight) *in_flight = info.in_flight ? 1 : 0;
  if (max_step_tokens) *max_step_tokens = info.max_step_tokens;
}
int32_t adafuse_slot_length(const adafuse_engine* engine, int32_t slot) {
  if (!adafuse::handles::valid(engine, Kind::engine) || slot < 0 || slot >= engine->backend->info().max_batch) return 0;
  return engine->backend->slot_length(slot);
}
adafuse_status adafuse_last_step_gpu_time(const adafuse_engine* engine, double* milliseconds) {
  return guarded([&] {
    need(engine, "engine");
    need(milliseconds, "milliseconds");
    const double ms = engine->backend->last_step_gpu_ms();
    if (ms < 0)
      adafuse::fail(ADAFUSE_ERR_UNSUPPORTED,
                    "no GPU time recorded: the engine's backend does not measure it, or no step has succeeded");
    *milliseconds = ms;
  });
}
int32_t adafuse_past_length(const adafuse_engine* engine) {
  return adafuse::handles::valid(engine, Kind::engine) ? engine->backend->past_length() : 0;
}
void adafuse_kv_shape(const adafuse_engine* engine, int32_t* layers, int32_t* kv_heads, int32_t* head_dim) {
  const adafuse::BackendInfo none;
  const adafuse::BackendInfo& info = adafuse::handles::valid(engine, Kind::engine) ? engine->backend->info() : none;
  if (layers) *layers = info.layers;
  if (kv_heads) *kv_heads = info.kv_heads;
  if (head_dim) *head_dim = info.head_dim;
}
adafuse_status adafuse_read_kv(const adafuse_engine* engine, int32_t layer, int32_t value, float* out) {
  return guarded([&] {
    need(engine, "engine");
    engine->backend->read_kv(layer, value != 0, out);
  });
}

}  // extern "C"
