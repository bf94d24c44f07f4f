// The backend an engine path names, opened the same way by the C API (adafuse_engine_open) and by
// adafuse-serve: a native artifact (a directory or a name ending in .native) runs on the native backend,
// anything else is a TensorRT engine checked against its manifest.
#pragma once

#include <memory>

#include "adafuse/runtime.h"
#include "backend.h"

namespace adafuse {

// options.engine_path is required; options.strategy is a native artifact's option (a TensorRT engine takes
// NULL or "fused" and is refused with one line otherwise).
std::unique_ptr<Backend> open_backend(const adafuse_open_options& options);

}  // namespace adafuse
