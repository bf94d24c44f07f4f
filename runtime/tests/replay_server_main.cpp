// TEST ONLY: the HTTP service over a test backend, so tests/test_runtime.py can drive the real service
// with a real HTTP client:
// - ReplayBackendForTests (logits recorded by `adafuse-export run --save-logits`; equal-length executor):
//     adafuse_replay_server_for_tests --logits F.safetensors [--max-batch B] [--max-seq S]
//                                     [--step-delay-ms MS] [--sticky-error-at-decode N]
// - HistoryBackendForTests (in-flight executor, a slot per sequence; tokens a pure function of the
//   history, HistoryBackendForTests::solo_tokens):
//     adafuse_replay_server_for_tests --history VOCAB [--max-batch B] [--max-seq S] [--step-delay-ms MS]
//                                     [--equal-length 1] (the backend without step(): the equal-length executor)
// and the service's options (--host H --port 0 --queue N --model-name NAME ...).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>

#include "error.h"
#include "history_backend_for_tests.h"
#include "http_service.h"
#include "replay_backend_for_tests.h"

int main(int argc, char** argv) {
  adafuse::ServiceOptions service;
  service.port = 0;
  std::string logits;
  int32_t max_batch = 4, max_seq = 0;
  long delay_ms = 0, sticky_at = 0, history_vocab = 0;
  bool equal_length = false;
  try {
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string arg = argv[i], value = argv[i + 1];
      if (arg == "--logits") logits = value;
      else if (arg == "--history") history_vocab = std::atol(value.c_str());
      else if (arg == "--equal-length") equal_length = value == "1";
      else if (arg == "--max-batch") max_batch = std::atoi(value.c_str());
      else if (arg == "--max-seq") max_seq = std::atoi(value.c_str());
      else if (arg == "--step-delay-ms") delay_ms = std::atol(value.c_str());
      else if (arg == "--sticky-error-at-decode") sticky_at = std::atol(value.c_str());
      else if (!adafuse::parse_service_option(arg, value, service))
        adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "unknown option " + arg);
    }
    std::unique_ptr<adafuse::Backend> backend;
    if (history_vocab > 0) {
      adafuse::HistoryBackendOptions o;
      o.vocab = history_vocab;
      o.max_batch = max_batch;
      if (max_seq > 0) o.max_seq = max_seq;
      o.step_delay = std::chrono::milliseconds(delay_ms);
      o.in_flight = !equal_length;
      backend = std::make_unique<adafuse::HistoryBackendForTests>(o);
      if (service.model_name.empty()) service.model_name = "history";
    } else {
      if (logits.empty()) adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "--logits or --history is required");
      adafuse::ReplayBackendForTests probe(logits, 1, 1);
      auto replay = std::make_unique<adafuse::ReplayBackendForTests>(
          logits, max_batch, max_seq > 0 ? max_seq : static_cast<int32_t>(probe.recorded_positions()), std::chrono::milliseconds(delay_ms));
      replay->fail_as_sticky_at_decode(sticky_at);
      backend = std::move(replay);
      if (service.model_name.empty()) service.model_name = std::filesystem::path(logits).stem().string();
    }
    return adafuse::serve(*backend, service);
  } catch (const adafuse::Error& e) {
    std::fprintf(stderr, "adafuse_replay_server_for_tests: %s\n", e.what());
    return 2;
  }
}
