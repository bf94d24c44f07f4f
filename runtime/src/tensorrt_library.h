// TensorRT opened at run time (dlopen), so the runtime builds and runs its own tests without it.
// Nothing here needs TensorRT's headers: the version check and the plugin library check use
// extern "C" entry points only.
#pragma once

#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <utility>

namespace adafuse {

// Oldest TensorRT major this runtime drives (the IExecutionContext::enqueueV3 / tensor-name API).
inline constexpr int kTensorRTMajor = 10;

class SharedLibrary {
 public:
  SharedLibrary() = default;
  SharedLibrary(void* handle, std::string path) : handle_(handle), path_(std::move(path)) {}
  SharedLibrary(SharedLibrary&& other) noexcept;
  SharedLibrary& operator=(SharedLibrary&& other) noexcept;
  SharedLibrary(const SharedLibrary&) = delete;
  SharedLibrary& operator=(const SharedLibrary&) = delete;
  ~SharedLibrary();
  void* symbol(const char* name) const;
  const std::string& path() const { return path_; }

 private:
  void* handle_ = nullptr;
  std::string path_;
};

struct TensorRTLibrary {
  SharedLibrary library;
  int version = 0;  // getInferLibVersion(): major * 10000 + minor * 100 + patch (TensorRT >= 10)
  std::string version_text;
};

// Opens `path`, or libnvinfer.so.10 then libnvinfer.so when path is empty; refuses a missing
// library or one older than TensorRT 10, naming the library and the version looked for.
TensorRTLibrary open_tensorrt(const std::string& path);

// Checks that `path` is a TensorRT plugin library (exports getCreators and setLoggerFinder, which
// IPluginRegistry::loadLibrary needs) before TensorRT loads it.
void check_plugin_library(const std::string& path, const std::string& engine);

// TensorRT keeps plugin creators in the process-wide registry of the loaded libnvinfer, and
// IPluginRegistry::loadLibrary fails when a plugin of the library is registered already: a plugin
// library is registered once per process and registry, however many engines are opened.
class PluginRegistrations {
 public:
  // Runs load() unless (registry, path) is registered; paths compare in canonical form. load() throws
  // on failure, which leaves the pair unregistered (a later open tries again). Returns whether load() ran.
  bool register_once(const void* registry, const std::string& path, const std::function<void()>& load);

 private:
  std::mutex mutex_;  // held across load(): two engines opened at once register the library once
  std::set<std::pair<const void*, std::string>> registered_;
};

// The process's registrations (what TensorRT's global registry holds).
PluginRegistrations& process_plugin_registrations();

}  // namespace adafuse
