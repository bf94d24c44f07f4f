#include "open_backend.h"

#include <string>

#include "error.h"
#include "manifest.h"
#include "native_artifact.h"
#include "native_backend.h"
#include "tensorrt_backend.h"

namespace adafuse {

std::unique_ptr<Backend> open_backend(const adafuse_open_options& options) {
  if (options.engine_path == nullptr) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "options.engine_path is required");
  if (is_native_artifact_path(options.engine_path)) return open_native_backend(NativeArtifact::open(options.engine_path), options);
  if (options.strategy != nullptr && std::string(options.strategy) != "fused")
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "options.strategy '" + std::string(options.strategy) +
                                           "': a TensorRT engine runs the strategy it was built with (NULL or "
                                           "'fused'); 'switch' is a native artifact's option");
  return open_tensorrt_backend(verify_engine(options.engine_path, true), options);
}

}  // namespace adafuse
