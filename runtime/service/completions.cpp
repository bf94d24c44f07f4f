#include "completions.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <mutex>
#include <random>

#include "error.h"
#include "json_fields.h"
#include "request.h"

namespace adafuse {
namespace {

using json_fields::json;

// A field OpenAI defines that this service supports only at its neutral value: absent, or `neutral`
// (or null), else refused naming why.
void only_neutral(const json& body, const char* name, const json& neutral, const std::string& why) {
  if (!body.contains(name) || body[name].is_null() || body[name] == neutral) return;
  fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' " + why + ", found " + json_fields::shown(body[name]));
}

std::vector<int64_t> prompt_ids(const json& body) {
  if (!body.contains("prompt")) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'prompt' is required (a list of token ids)");
  const json& p = body["prompt"];
  const bool text = p.is_string() || (p.is_array() && !p.empty() && p[0].is_string());
  if (text)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'prompt' is text: this service has no tokenizer; send token ids (a list of integers)");
  if (p.is_array() && !p.empty() && p[0].is_array()) {  // [[ids], ...]: one prompt per request
    if (p.size() != 1)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'prompt' holds " + std::to_string(p.size()) + " prompts; send one per request");
    return json_fields::ids_of(p[0], "prompt");
  }
  return json_fields::ids_of(p, "prompt");
}

uint64_t fresh_seed() {
  static std::mutex mutex;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(mutex);
  return rng() >> 1;  // below 2^63, like a seed sent in the body
}

json choice(json token_ids, json finish_reason) {
  return json{{"index", 0}, {"text", ""}, {"token_ids", std::move(token_ids)}, {"logprobs", nullptr},
              {"finish_reason", std::move(finish_reason)}};
}

json envelope(const CompletionIdentity& who, json choices) {
  return json{{"id", who.id}, {"object", "text_completion"}, {"created", who.created}, {"model", who.model},
              {"choices", std::move(choices)}};
}

json usage(size_t prompt_tokens, size_t completion_tokens) {
  return json{{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion_tokens},
              {"total_tokens", prompt_tokens + completion_tokens}};
}

// OpenAI names two reasons: a stop token is "stop", the budget "length".
std::string finish_reason(const GenerateResult& r) { return r.finish_reason == "length" ? "length" : "stop"; }

json error_body(const std::string& message, int status) {
  const char* type = status == 404 ? "not_found_error"
                     : status == 503 ? "service_unavailable"
                     : status >= 500 ? "server_error"
                                     : "invalid_request_error";
  return json{{"error", {{"message", message}, {"type", type}, {"param", nullptr}, {"code", status == 404 ? json("model_not_found") : json(nullptr)}}}};
}

std::string event(const json& data) { return "data: " + data.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n"; }

}  // namespace

CompletionRequest parse_completion_request(const std::string& text, const std::string& model_name) {
  using namespace json_fields;
  const json body = parse_object(text, kMaxRequestDepth);
  only_known_fields(body, {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                           "stream", "stream_options", "n", "best_of", "echo", "logprobs", "presence_penalty",
                           "frequency_penalty", "logit_bias", "suffix", "user"});
  if (body.contains("model")) {
    if (!body["model"].is_string()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'model' must be a string, found " + shown(body["model"]));
    if (body["model"].get<std::string>() != model_name)
      throw ModelNotFound("the model " + shown(body["model"]) + " does not exist; this service serves \"" + model_name + "\"");
  }
  if (body.contains("user") && !body["user"].is_string())
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'user' must be a string, found " + shown(body["user"]));
  only_neutral(body, "n", 1, "must be 1 (one choice per request)");
  only_neutral(body, "best_of", 1, "must be 1");
  only_neutral(body, "echo", false, "must be false");
  only_neutral(body, "logprobs", json(), "is not supported (no log-probabilities are returned)");
  only_neutral(body, "presence_penalty", 0, "must be 0 (no penalties)");
  only_neutral(body, "frequency_penalty", 0, "must be 0 (no penalties)");
  only_neutral(body, "logit_bias", json::object(), "is not supported");
  only_neutral(body, "suffix", "", "is not supported");
  only_neutral(body, "stop", json::array(), "holds text: this service has no tokenizer; use 'stop_token_ids'");

  CompletionRequest out;
  auto request = std::make_shared<GenerateRequest>();
  request->prompt_field = "prompt";
  request->budget_field = "max_tokens";
  request->prompt = prompt_ids(body);
  request->options.max_new_tokens = static_cast<int32_t>(integer_field(body, "max_tokens", 16, 1, INT32_MAX));
  request->options.sampling.temperature = number_field(body, "temperature", 1.0f);
  request->options.sampling.top_p = number_field(body, "top_p", 1.0f);
  // vLLM spells "no top-k" -1; 0 here.
  request->options.sampling.top_k = static_cast<int32_t>(std::max<int64_t>(0, integer_field(body, "top_k", 0, -1, INT32_MAX)));
  request->options.sampling.seed = body.contains("seed") && !body["seed"].is_null()
                                       ? static_cast<uint64_t>(integer_field(body, "seed", 0, 0, INT64_MAX))
                                       : fresh_seed();
  request->options.stop_ids = ids_field(body, "stop_token_ids", false);
  out.stream = bool_field(body, "stream", false);
  if (body.contains("stream_options") && !body["stream_options"].is_null()) {
    const json& so = body["stream_options"];
    if (!so.is_object()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'stream_options' must be an object, found " + shown(so));
    only_known_fields(so, {"include_usage"});
    out.include_usage = bool_field(so, "include_usage", false);
    if (!out.stream) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'stream_options' is only allowed with \"stream\": true");
  }
  out.request = std::move(request);
  return out;
}

CompletionIdentity new_completion(const std::string& model) {
  static std::atomic<uint64_t> next{1};
  char id[32];
  std::snprintf(id, sizeof(id), "cmpl-%llx", static_cast<unsigned long long>(next++));
  return CompletionIdentity{id, std::time(nullptr), model};
}

std::string completion_response(const CompletionIdentity& who, size_t prompt_tokens, const GenerateResult& result) {
  json body = envelope(who, json::array({choice(result.tokens, finish_reason(result))}));
  body["usage"] = usage(prompt_tokens, result.tokens.size());
  return body.dump() + "\n";
}

std::string completion_token_event(const CompletionIdentity& who, int64_t token) {
  return event(envelope(who, json::array({choice(json::array({token}), nullptr)})));
}

std::string completion_end_events(const CompletionIdentity& who, size_t prompt_tokens, const GenerateResult& result,
                                  bool include_usage) {
  std::string text;
  if (!result.error.empty()) {
    text = event(error_body(result.error, 500));
  } else {
    text = event(envelope(who, json::array({choice(json::array(), finish_reason(result))})));
    if (include_usage) {
      json last = envelope(who, json::array());
      last["usage"] = usage(prompt_tokens, result.tokens.size());
      text += event(last);
    }
  }
  return text + "data: [DONE]\n\n";
}

std::string openai_error(const std::string& message, int status) {
  const char* type = status == 404 ? "not_found_error"
                     : status == 503 ? "service_unavailable"
                     : status >= 500 ? "server_error"
                                     : "invalid_request_error";
  json body{{"error", {{"message", message}, {"type", type}, {"param", nullptr}, {"code", status == 404 ? json("model_not_found") : json(nullptr)}}}};
  return body.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

std::string models_response(const std::string& model, std::time_t created) {
  return json{{"object", "list"},
              {"data", json::array({json{{"id", model}, {"object", "model"}, {"created", created}, {"owned_by", "adafuse"}}})}}
             .dump() + "\n";
}

}  // namespace adafuse
