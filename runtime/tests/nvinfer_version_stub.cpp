// Test stand-in for libnvinfer: only the entry points the runtime's version check reads.
// STUB_VERSION follows getInferLibVersion(): 8601 is TensorRT 8.6.1, 101401 is 10.14.1, 110400 is 11.4.0.
#include <cstdint>

extern "C" int32_t getInferLibVersion() noexcept { return STUB_VERSION; }
// No runtime behind it: a caller that gets past the version check is told TensorRT made no runtime.
extern "C" void* createInferRuntime_INTERNAL(void*, int32_t) noexcept { return nullptr; }
