// The body of POST /v1/generate as a checked GenerateRequest (no HTTP here, so the fuzz harness and
// the unit tests drive it directly). Nesting is bounded before nlohmann builds a DOM.
#pragma once

#include <memory>
#include <string>

#include "scheduler.h"

namespace adafuse {

// A request body nests 2 deep ({"prompt_ids": [..]}); 16 leaves room and bounds the parser.
inline constexpr int kMaxRequestDepth = 16;

// The request, or an Error (ADAFUSE_ERR_INVALID_ARGUMENT, one line) for the 400 answer.
std::shared_ptr<GenerateRequest> parse_request(const std::string& text, bool& stream);

}  // namespace adafuse
