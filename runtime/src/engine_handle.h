// The C API's engine handle: a Backend behind an opaque pointer. Tests wrap their own backends.
#pragma once

#include <memory>

#include "adafuse/runtime.h"
#include "backend.h"

struct adafuse_engine {
  std::unique_ptr<adafuse::Backend> backend;
};
