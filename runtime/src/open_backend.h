// The backend an engine path names, opened: a native artifact (a directory or a name ending in
// .native: the native backend, in-flight batching) or a TensorRT engine (its manifest verified first).
// One dispatch for the C API (adafuse_engine_open) and adafuse-serve.
#pragma once

#include <memory>

#include "adafuse/runtime.h"
#include "backend.h"

namespace adafuse {

std::unique_ptr<Backend> open_backend(const adafuse_open_options& options);

}  // namespace adafuse
