// Test stand-ins for a plugin library: with WITH_ENTRY_POINTS it exports what
// IPluginRegistry::loadLibrary looks for (getCreators, setLoggerFinder), without it exports neither;
// with STUB_TENSORRT_MAJOR also adafuse_plugin_tensorrt_major() (the TensorRT major it was built for).
#include <cstdint>

#ifdef WITH_ENTRY_POINTS
extern "C" void* getCreators(int32_t& count) noexcept {
  count = 0;
  return nullptr;
}
extern "C" void setLoggerFinder(void*) noexcept {}
#ifdef STUB_TENSORRT_MAJOR
extern "C" int32_t adafuse_plugin_tensorrt_major() noexcept { return STUB_TENSORRT_MAJOR; }
#endif
#else
extern "C" int32_t unrelated_function() noexcept { return 0; }
#endif
