// TEST ONLY: the HTTP service over ReplayBackendForTests (logits recorded by `adafuse-export run
// --save-logits`), so tests/test_runtime.py can drive the real service with a real HTTP client.
//   adafuse_replay_server_for_tests --logits F.safetensors [--max-batch B] [--max-seq S]
//                                   [--step-delay-ms MS] [--sticky-error-at-decode N] [--host H] [--port 0]
//                                   [--queue N]
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "error.h"
#include "http_service.h"
#include "replay_backend_for_tests.h"

int main(int argc, char** argv) {
  adafuse::ServiceOptions service;
  service.port = 0;
  std::string logits;
  int32_t max_batch = 4, max_seq = 0;
  long delay_ms = 0, sticky_at = 0;
  try {
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string arg = argv[i], value = argv[i + 1];
      if (arg == "--logits") logits = value;
      else if (arg == "--max-batch") max_batch = std::atoi(value.c_str());
      else if (arg == "--max-seq") max_seq = std::atoi(value.c_str());
      else if (arg == "--step-delay-ms") delay_ms = std::atol(value.c_str());
      else if (arg == "--sticky-error-at-decode") sticky_at = std::atol(value.c_str());
      else if (!adafuse::parse_service_option(arg, value, service))
        adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "unknown option " + arg);
    }
    if (logits.empty()) adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "--logits is required");
    adafuse::ReplayBackendForTests probe(logits, 1, 1);
    adafuse::ReplayBackendForTests backend(logits, max_batch, max_seq > 0 ? max_seq : static_cast<int32_t>(probe.recorded_positions()),
                                           std::chrono::milliseconds(delay_ms));
    backend.fail_as_sticky_at_decode(sticky_at);
    return adafuse::serve(backend, service);
  } catch (const adafuse::Error& e) {
    std::fprintf(stderr, "adafuse_replay_server_for_tests: %s\n", e.what());
    return 2;
  }
}
