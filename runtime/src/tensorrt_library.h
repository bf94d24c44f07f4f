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

// Which TensorRT runtime library an engine needs: the full one (libnvinfer), or the lean runtime
// (libnvinfer_lean, about a tenth of the size, no builder), which deserializes only version-compatible engines
// (`convert --version-compatible`). Both export the same C entry points and the same IRuntime.
enum class TensorRTRuntime { full, lean };

// The TensorRT major this runtime was built for (its headers' NV_TENSORRT_MAJOR), and that
// major's library name: libnvinfer.so.<major> (lean: libnvinfer_lean.so.<major>).
int tensorrt_major();
std::string tensorrt_soname(TensorRTRuntime kind = TensorRTRuntime::full);

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
  TensorRTRuntime kind = TensorRTRuntime::full;  // the library looked for
};

// Where pip puts other wheels' shared libraries: `folders` (relative paths) inside each site-packages this
// process can see (beside the runtime library itself, $VIRTUAL_ENV, $CONDA_PREFIX, $PYTHONPATH, ~/.local,
// /usr/local, /usr), those that exist, canonical and without repeats, sites in that order and each site's
// folders in the order given. The one search for TensorRT's (pip_tensorrt_dirs) and cuBLASLt's (cublaslt.h).
std::vector<std::string> pip_library_dirs(const std::vector<std::string>& folders);

// pip_library_dirs of TensorRT: tensorrt_libs (tensorrt-cuXX-libs); for the lean runtime each site's
// tensorrt_lean_libs (tensorrt-lean-cuXX-libs) first, then its tensorrt_libs (the full wheel ships it too).
std::vector<std::string> pip_tensorrt_dirs(TensorRTRuntime kind = TensorRTRuntime::full);

// Opens `path`; when path is empty, tensorrt_soname(kind) then its unversioned name (libnvinfer.so,
// libnvinfer_lean.so) from the loader's path, then tensorrt_soname(kind) in pip_tensorrt_dirs(kind). Refuses a
// missing library, or one of another TensorRT major than this runtime's, naming the library and the version
// looked for.
TensorRTLibrary open_tensorrt(const std::string& path, TensorRTRuntime kind = TensorRTRuntime::full);

// Refuses to deserialize an engine with a TensorRT other than the one that built it (major, minor,
// patch): `recorded` is the manifest's engine.backend_version. Names both versions. A version-compatible
// engine is built without the lean runtime in its plan (BuilderFlag::kEXCLUDE_LEAN_RUNTIME), and such a plan
// runs on the lean runtime of the TensorRT that built it (NvInferRuntime.h, IRuntime::loadRuntime): the same
// rule, said in terms of the lean runtime.
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
