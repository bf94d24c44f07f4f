#include "request.h"

#include <cstdint>
#include <set>

#include "error.h"
#include "json_fields.h"

namespace adafuse {

// stream tells whether to answer as ndjson.
std::shared_ptr<GenerateRequest> parse_request(const std::string& text, bool& stream) {
  using namespace json_fields;
  const json body = parse_object(text, kMaxRequestDepth);
  only_known_fields(body, {"prompt_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_ids", "stream"});
  auto request = std::make_shared<GenerateRequest>();
  request->prompt = ids_field(body, "prompt_ids", true);
  request->options.max_new_tokens = static_cast<int32_t>(integer_field(body, "max_new_tokens", 16, 1, INT32_MAX));
  request->options.sampling.temperature = number_field(body, "temperature", 0.0f);
  request->options.sampling.top_k = static_cast<int32_t>(integer_field(body, "top_k", 0, 0, INT32_MAX));
  request->options.sampling.top_p = number_field(body, "top_p", 1.0f);
  request->options.sampling.seed = static_cast<uint64_t>(integer_field(body, "seed", 0, 0, INT64_MAX));
  request->options.stop_ids = ids_field(body, "stop_ids", false);
  stream = bool_field(body, "stream", false);
  return request;
}

}  // namespace adafuse
