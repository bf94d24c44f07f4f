#include "tensorrt_library.h"

#include <dlfcn.h>

#include <cstdint>
#include <filesystem>
#include <vector>

#include "error.h"

namespace adafuse {

SharedLibrary::SharedLibrary(SharedLibrary&& other) noexcept : handle_(other.handle_), path_(std::move(other.path_)) {
  other.handle_ = nullptr;
}
SharedLibrary& SharedLibrary::operator=(SharedLibrary&& other) noexcept {
  std::swap(handle_, other.handle_);
  std::swap(path_, other.path_);
  return *this;
}
SharedLibrary::~SharedLibrary() {
  if (handle_ != nullptr) dlclose(handle_);
}
void* SharedLibrary::symbol(const char* name) const { return handle_ ? dlsym(handle_, name) : nullptr; }

namespace {

std::string version_text(int v) {
  // TensorRT >= 10: major*10000 + minor*100 + patch; before: major*1000 + minor*100 + patch.
  const int major = v >= 100000 ? v / 10000 : v / 1000;
  const int minor = v >= 100000 ? (v / 100) % 100 : (v / 100) % 10;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(v % 100);
}

}  // namespace

TensorRTLibrary open_tensorrt(const std::string& path) {
  const std::string want = "TensorRT " + std::to_string(kTensorRTMajor) + ".x";
  std::vector<std::string> names = path.empty() ? std::vector<std::string>{"libnvinfer.so.10", "libnvinfer.so"}
                                                : std::vector<std::string>{path};
  std::string errors;
  for (const auto& name : names) {
    dlerror();
    void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      errors += (errors.empty() ? "" : "; ") + std::string(why ? why : name.c_str());
      continue;
    }
    TensorRTLibrary lib{SharedLibrary(handle, name), 0, ""};
    using VersionFn = int32_t (*)();
    auto get_version = reinterpret_cast<VersionFn>(lib.library.symbol("getInferLibVersion"));
    if (get_version == nullptr || lib.library.symbol("createInferRuntime_INTERNAL") == nullptr)
      fail(ADAFUSE_ERR_TENSORRT, name + ": not a TensorRT runtime library (no getInferLibVersion / "
                                        "createInferRuntime_INTERNAL); this runtime needs " + want + " (libnvinfer.so.10)");
    lib.version = get_version();
    lib.version_text = version_text(lib.version);
    const int major = lib.version >= 100000 ? lib.version / 10000 : lib.version / 1000;
    if (major < kTensorRTMajor)
      fail(ADAFUSE_ERR_TENSORRT, name + ": TensorRT " + lib.version_text + " is too old; this runtime needs " + want +
                                     " (libnvinfer.so.10)");
    if (major > kTensorRTMajor)
      fail(ADAFUSE_ERR_TENSORRT, name + ": TensorRT " + lib.version_text + " is newer than this runtime was built for; it needs " +
                                     want + " (libnvinfer.so.10)");
    return lib;
  }
  fail(ADAFUSE_ERR_TENSORRT, "TensorRT not found: this runtime needs " + want + " (tried " +
                                 (path.empty() ? std::string("libnvinfer.so.10, libnvinfer.so") : path) + ": " + errors +
                                 "); install TensorRT 10 or pass its libnvinfer.so path");
}

void check_plugin_library(const std::string& path, const std::string& engine) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    fail(ADAFUSE_ERR_PLUGIN, path + ": plugin library not found (needed by " + engine + ")");
  dlerror();
  void* handle = dlopen(path.c_str(), RTLD_LAZY | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    fail(ADAFUSE_ERR_PLUGIN, path + ": cannot load the plugin library: " + (why ? why : "dlopen failed"));
  }
  SharedLibrary lib(handle, path);
  for (const char* name : {"getCreators", "setLoggerFinder"})
    if (lib.symbol(name) == nullptr)
      fail(ADAFUSE_ERR_PLUGIN, path + ": not a TensorRT plugin library (it does not export " + name +
                                   ", which IPluginRegistry::loadLibrary needs)");
}

bool PluginRegistrations::register_once(const void* registry, const std::string& path, const std::function<void()>& load) {
  std::error_code ec;
  std::filesystem::path canonical = std::filesystem::weakly_canonical(path, ec);
  const auto key = std::make_pair(registry, ec ? path : canonical.string());
  std::lock_guard<std::mutex> lock(mutex_);
  if (registered_.count(key)) return false;
  load();
  registered_.insert(key);
  return true;
}

PluginRegistrations& process_plugin_registrations() {
  static PluginRegistrations registrations;
  return registrations;
}

}  // namespace adafuse
