// TensorRT opened at run time (dlopen), so the runtime builds and runs its own tests without it.
// The version check and the plugin library check use extern "C" entry points only; the TensorRT
// major this runtime drives is the one of the headers it was built against (NV_TENSORRT_MAJOR):
// TensorRT 11 keeps the IPluginV3 interfaces but changes ILogger's layout, so a build is for one major.
#pragma once

#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace adafuse {

// The TensorRT major this runtime was built for (its headers' NV_TENSORRT_MAJOR), and that
// major's library name: libnvinfer.so.<major>.
int tensorrt_major();
std::string tensorrt_soname();

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

// Where pip puts TensorRT's libraries: the tensorrt_libs folders of the site-packages this process
// can see (beside the runtime library itself, $VIRTUAL_ENV, $CONDA_PREFIX, $PYTHONPATH, ~/.local,
// /usr/local, /usr), those that exist, in that order.
std::vector<std::string> pip_tensorrt_dirs();

// Opens `path`; when path is empty, libnvinfer.so.<major> then libnvinfer.so from the loader's path,
// then libnvinfer.so.<major> in pip_tensorrt_dirs(). Refuses a missing library, or one of another
// TensorRT major than this runtime's, naming the library and the version looked for.
TensorRTLibrary open_tensorrt(const std::string& path);

// Refuses to deserialize an engine with a TensorRT other than the one that built it (major, minor,
// patch): `recorded` is the manifest's engine.backend_version. Names both versions.
void check_engine_tensorrt_version(const std::string& engine, const std::string& recorded, const TensorRTLibrary& trt);

// Checks that `path` is a TensorRT plugin library (exports getCreators and setLoggerFinder, which
// IPluginRegistry::loadLibrary needs) built for this runtime's TensorRT major (its
// adafuse_plugin_tensorrt_major(), where it exports one), before TensorRT loads it.
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
