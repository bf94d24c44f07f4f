// The C API's engine handle: a Backend behind an opaque pointer. Tests wrap their own backends with
// adafuse::make_engine_handle, which records the handle as c_api.cpp's own handles are recorded.
#pragma once

#include <memory>

#include "adafuse/runtime.h"
#include "backend.h"
#include "handles.h"

struct adafuse_engine {
  std::unique_ptr<adafuse::Backend> backend;
};

namespace adafuse {
inline adafuse_engine* make_engine_handle(std::unique_ptr<Backend> backend) {
  auto* engine = new adafuse_engine{std::move(backend)};
  handles::add(engine, handles::Kind::engine);
  return engine;
}
}  // namespace adafuse
