// The production backend: a TensorRT engine made by `adafuse-export convert`, run on one GPU.
#pragma once

#include <memory>

#include "adafuse/runtime.h"
#include "backend.h"
#include "manifest.h"

namespace adafuse {

// Checks the engine contract and the plugin library, opens TensorRT (dlopen), deserializes the
// engine, creates one execution context per profile and allocates the KV cache.
std::unique_ptr<Backend> open_tensorrt_backend(const Manifest& manifest, const adafuse_open_options& options);

}  // namespace adafuse
