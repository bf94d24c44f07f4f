// The OpenAI-style completions API over token ids (no tokenizer in the service):
//   POST /v1/completions {"prompt": [ids] | [[ids]], "max_tokens": 16, "temperature": 1, "top_p": 1,
//                         "top_k": 0 (extension), "seed": n, "stop_token_ids": [ids] (extension),
//                         "stream": false, "stream_options": {"include_usage": false}, "model": name}
//     -> {"id", "object": "text_completion", "created", "model",
//         "choices": [{"index": 0, "text": "", "token_ids": [..], "logprobs": null, "finish_reason": "stop|length"}],
//         "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
//     "text" is always "" (no detokenizer): the output is "token_ids". Streamed as server-sent
//     events, one chunk per token, a last chunk with the finish_reason, then `data: [DONE]`.
//   GET /v1/models -> {"object": "list", "data": [{"id": name, "object": "model", "created", "owned_by"}]}
// Text prompts, text stops, n > 1, echo, logprobs, best_of, penalties and logit_bias are refused
// (400, OpenAI's error shape) rather than ignored. Defaults follow OpenAI: temperature 1, and a
// request without a seed samples with a fresh one.
#pragma once

#include <cstdint>
#include <ctime>
#include <memory>
#include <string>

#include "scheduler.h"

namespace adafuse {

struct CompletionRequest {
  std::shared_ptr<GenerateRequest> request;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a usage chunk before [DONE]
};

// The body as a checked request; an Error (one line) for 400, or NotFound when "model" names
// another model (404, as OpenAI answers).
CompletionRequest parse_completion_request(const std::string& text, const std::string& model_name);

struct ModelNotFound : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One completion's identity, shared by its response or all of its chunks.
struct CompletionIdentity {
  std::string id;  // cmpl-<n>
  std::time_t created;
  std::string model;
};
CompletionIdentity new_completion(const std::string& model);

// The non-streaming response.
std::string completion_response(const CompletionIdentity& who, size_t prompt_tokens, const GenerateResult& result);
// Server-sent events: one token; the end (finish_reason, the usage chunk if asked, [DONE]); an error.
std::string completion_token_event(const CompletionIdentity& who, int64_t token);
std::string completion_end_events(const CompletionIdentity& who, size_t prompt_tokens, const GenerateResult& result,
                                  bool include_usage);
// OpenAI's error body: {"error": {"message", "type", "param": null, "code"}}.
std::string openai_error(const std::string& message, int status);
std::string models_response(const std::string& model, std::time_t created);

}  // namespace adafuse
