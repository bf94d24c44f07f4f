// The HTTP front of the service (cpp-httplib + nlohmann-json):
//   POST /v1/generate  {"prompt_ids": [..], "max_new_tokens": 16, "temperature": 0, "top_k": 0,
//                       "top_p": 1, "seed": 0, "stop_ids": [], "stream": false}
//                      -> {"tokens": [..], "finish_reason": "stop|length|cancelled"}
//                      stream: application/x-ndjson, one {"token": t} line per token, then the result line
//   GET /health        -> {"status": "ok", "backend": .., "max_batch": .., "max_seq": .., "vocab": ..}, or 503
//                         {"status": "unavailable", "error": ..} once the backend is unusable (a sticky CUDA error)
//   GET /health/live   -> {"status": "ok"}, or the same 503 (liveness: restart the process)
//   GET /metrics       -> Prometheus text (metrics.h; runtime/README.md says what each metric means)
//   POST /v1/completions, GET /v1/models: the OpenAI-style API over token ids (completions.h)
// A bad request gets 400 with {"error": "<one line>"} (JSON nested deeper than 16 levels included);
// a chunked or compressed body 411 / 415; a full queue or too many connections 503 (Retry-After: 1);
// an engine failure 500. A request whose client goes away is cancelled within one engine step, its
// slot freed, and counted as 499.
#pragma once

#include <cstdint>
#include <string>

#include "backend.h"

namespace adafuse {

struct ServiceOptions {
  std::string host = "127.0.0.1";
  int port = 8000;  // 0: any free port (printed on start)
  size_t queue_capacity = 64;
  size_t max_body_bytes = 1 << 20;
  // Connection bounds (bounded_server.h): open connections, the wait for a request to begin, and
  // the time a request's head and body may take to arrive.
  size_t max_connections = 1024;
  long idle_timeout_ms = 5000;
  long request_deadline_ms = 10000;
  // In-flight backends: the most tokens per engine step (decode rows + prefill chunks); 0: the
  // backend's max_step_tokens. Smaller bounds the step time running sequences wait for.
  int32_t step_tokens = 0;
  // The one model /v1/models lists and /v1/completions accepts in "model" (empty: "adafuse").
  std::string model_name;
};

// Reads one service option (--host, --port, --queue, --max-connections, --idle-timeout-ms,
// --request-timeout-ms, --step-tokens, --model-name) into options; false when `flag` is not one.
bool parse_service_option(const std::string& flag, const std::string& value, ServiceOptions& options);

// Serves until SIGINT or SIGTERM; prints "listening on http://HOST:PORT" once bound. Returns an exit code.
int serve(Backend& backend, const ServiceOptions& options);

}  // namespace adafuse
