// One exception type inside the runtime; the C API turns it into a status code and a message.
#pragma once

#include <stdexcept>
#include <string>

#include "adafuse/runtime.h"

namespace adafuse {

class Error : public std::runtime_error {
 public:
  Error(adafuse_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  adafuse_status status() const { return status_; }

 private:
  adafuse_status status_;
};

[[noreturn]] inline void fail(adafuse_status status, const std::string& message) { throw Error(status, message); }

}  // namespace adafuse
