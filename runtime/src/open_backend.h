// The backend an engine path names: a native artifact (a directory, run by the project's kernels) or a
// TensorRT engine (checked through its manifest first). One place, so the C API, adafuse-serve and
// adafuse-generate open the same way.
#pragma once

#include <memory>

#include "adafuse/runtime.h"
#include "backend.h"

namespace adafuse {

std::unique_ptr<Backend> open_backend(const adafuse_open_options& options);

}  // namespace adafuse
