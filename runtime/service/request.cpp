#include "request.h"

#include <nlohmann/json.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <set>

#include "error.h"
#include "files.h"

namespace adafuse {
namespace {

using nlohmann::json;

// A value as a message shows it: JSON, cut to 60 characters (a body may hold a megabyte).
std::string shown(const json& v) {
  const std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return text.size() <= 60 ? text : text.substr(0, 57) + "...";
}

int64_t integer_field(const json& body, const char* name, int64_t fallback, int64_t low, int64_t high) {
  if (!body.contains(name)) return fallback;
  const json& v = body[name];
  if (!v.is_number_integer() || v.get<int64_t>() < low || v.get<int64_t>() > high)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be an integer in [" + std::to_string(low) + ", " +
                                           std::to_string(high) + "], found " + shown(v));
  return v.get<int64_t>();
}

float number_field(const json& body, const char* name, float fallback) {
  if (!body.contains(name)) return fallback;
  const json& v = body[name];
  // A double beyond float's range would make the conversion undefined: refused like any bad number.
  if (!v.is_number() || !(std::fabs(v.get<double>()) <= static_cast<double>(FLT_MAX)))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be a number, found " + shown(v));
  return static_cast<float>(v.get<double>());
}

std::vector<int64_t> ids_field(const json& body, const char* name, bool required) {
  if (!body.contains(name)) {
    if (required) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' is required (a list of token ids)");
    return {};
  }
  const json& v = body[name];
  if (!v.is_array()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be a list of token ids, found " + shown(v));
  std::vector<int64_t> ids;
  for (const json& id : v) {
    if (!id.is_number_integer())
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must hold integer token ids, found " + shown(id));
    // nlohmann keeps 2^63..2^64-1 as unsigned: converted to int64 it would wrap (2^64-1 became -1 in
    // the message), so it is refused here, shown as sent.
    if (id.is_number_unsigned() && id.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string(name) + "[" + std::to_string(ids.size()) + "] = " +
                                             std::to_string(id.get<uint64_t>()) + " is not a token id (ids lie below 2^63)");
    ids.push_back(id.get<int64_t>());
  }
  return ids;
}

}  // namespace

// stream tells whether to answer as ndjson.
std::shared_ptr<GenerateRequest> parse_request(const std::string& text, bool& stream) {
  // nlohmann's DOM of a deeply nested body would exhaust the stack: its depth is counted first by an
  // iterative SAX pass (files.h json_depth), and a deeper body never reaches the DOM parser.
  const int depth = json_depth(text, kMaxRequestDepth);
  if (depth > kMaxRequestDepth)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "JSON nested deeper than " + std::to_string(kMaxRequestDepth) + " levels");
  json body;
  try {
    body = json::parse(text);
  } catch (const json::parse_error& e) {
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "malformed JSON at byte " + std::to_string(e.byte));
  }  catch (const json::exception& e) {  // a number beyond double's range (1e309): out_of_range, not parse_error
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("malformed JSON: ") + e.what());
  }
  if (!body.is_object()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("expected a JSON object, found ") + body.type_name());
  static const std::set<std::string> known = {"prompt_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                                              "stop_ids", "stream"};
  for (const auto& [key, value] : body.items())
    if (!known.count(key)) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "unknown field '" + (key.size() <= 60 ? key : key.substr(0, 57) + "...") + "'");
  auto request = std::make_shared<GenerateRequest>();
  request->prompt = ids_field(body, "prompt_ids", true);
  request->options.max_new_tokens = static_cast<int32_t>(integer_field(body, "max_new_tokens", 16, 1, INT32_MAX));
  request->options.sampling.temperature = number_field(body, "temperature", 0.0f);
  request->options.sampling.top_k = static_cast<int32_t>(integer_field(body, "top_k", 0, 0, INT32_MAX));
  request->options.sampling.top_p = number_field(body, "top_p", 1.0f);
  request->options.sampling.seed = static_cast<uint64_t>(integer_field(body, "seed", 0, 0, INT64_MAX));
  request->options.stop_ids = ids_field(body, "stop_ids", false);
  stream = false;
  if (body.contains("stream")) {
    if (!body["stream"].is_boolean()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'stream' must be true or false, found " + shown(body["stream"]));
    stream = body["stream"].get<bool>();
  }
  return request;
}

}  // namespace adafuse
