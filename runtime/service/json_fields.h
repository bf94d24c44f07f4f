// Typed fields of a JSON request body, each refused in one line naming the field, what it must be and
// what was sent (shown cut to 60 characters). Shared by the bodies of /v1/generate (request.cpp) and
// /v1/completions (completions.cpp).
#pragma once

#include <nlohmann/json.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "error.h"
#include "files.h"

namespace adafuse::json_fields {

using nlohmann::json;

// A value as a message shows it: JSON, cut to 60 characters (a body may hold a megabyte).
inline std::string shown(const json& v) {
  const std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return text.size() <= 60 ? text : text.substr(0, 57) + "...";
}

inline int64_t integer_field(const json& body, const char* name, int64_t fallback, int64_t low, int64_t high) {
  if (!body.contains(name)) return fallback;
  const json& v = body[name];
  if (!v.is_number_integer() || v.get<int64_t>() < low || v.get<int64_t>() > high)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be an integer in [" + std::to_string(low) + ", " +
                                           std::to_string(high) + "], found " + shown(v));
  return v.get<int64_t>();
}

inline float number_field(const json& body, const char* name, float fallback) {
  if (!body.contains(name)) return fallback;
  const json& v = body[name];
  // A double beyond float's range would make the conversion undefined: refused like any bad number.
  if (!v.is_number() || !(std::fabs(v.get<double>()) <= static_cast<double>(FLT_MAX)))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be a number, found " + shown(v));
  return static_cast<float>(v.get<double>());
}

// A list of token ids (`name` names it in messages).
inline std::vector<int64_t> ids_of(const json& v, const std::string& name) {
  if (!v.is_array()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'" + name + "' must be a list of token ids, found " + shown(v));
  std::vector<int64_t> ids;
  for (const json& id : v) {
    if (!id.is_number_integer())
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'" + name + "' must hold integer token ids, found " + shown(id));
    // nlohmann keeps 2^63..2^64-1 as unsigned: converted to int64 it would wrap (2^64-1 became -1 in
    // the message), so it is refused here, shown as sent.
    if (id.is_number_unsigned() && id.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, name + "[" + std::to_string(ids.size()) + "] = " + std::to_string(id.get<uint64_t>()) +
                                             " is not a token id (ids lie below 2^63)");
    ids.push_back(id.get<int64_t>());
  }
  return ids;
}

inline std::vector<int64_t> ids_field(const json& body, const char* name, bool required) {
  if (!body.contains(name)) {
    if (required) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' is required (a list of token ids)");
    return {};
  }
  return ids_of(body[name], name);
}

inline bool bool_field(const json& body, const char* name, bool fallback) {
  if (!body.contains(name)) return fallback;
  if (!body[name].is_boolean()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be true or false, found " + shown(body[name]));
  return body[name].get<bool>();
}

// A JSON object parsed after its nesting was bounded, or an Error for the 400 answer. nlohmann's DOM
// of a deeply nested body would exhaust the stack: the depth is counted first by an iterative SAX
// pass (files.h json_depth), and a deeper body never reaches the DOM parser.
inline json parse_object(const std::string& text, int max_depth) {
  if (json_depth(text, max_depth) > max_depth)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "JSON nested deeper than " + std::to_string(max_depth) + " levels");
  json body;
  try {
    body = json::parse(text);
  } catch (const json::parse_error& e) {
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "malformed JSON at byte " + std::to_string(e.byte));
  } catch (const json::exception& e) {  // a number beyond double's range (1e309): out_of_range, not parse_error
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("malformed JSON: ") + e.what());
  }
  if (!body.is_object()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("expected a JSON object, found ") + body.type_name());
  return body;
}

// Refuses the first field not in `known`.
inline void only_known_fields(const json& body, const std::set<std::string>& known) {
  for (const auto& [key, value] : body.items())
    if (!known.count(key)) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "unknown field '" + (key.size() <= 60 ? key : key.substr(0, 57) + "...") + "'");
}

}  // namespace adafuse::json_fields
