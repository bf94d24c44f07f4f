// Test stand-ins for a plugin library: with WITH_ENTRY_POINTS it exports what
// IPluginRegistry::loadLibrary looks for (getCreators, setLoggerFinder), without it exports neither.
#include <cstdint>

#ifdef WITH_ENTRY_POINTS
extern "C" void* getCreators(int32_t& count) noexcept {
  count = 0;
  return nullptr;
}
extern "C" void setLoggerFinder(void*) noexcept {}
#else
extern "C" int32_t unrelated_function() noexcept { return 0; }
#endif
