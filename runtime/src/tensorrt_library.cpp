#include "tensorrt_library.h"

#include <NvInferVersion.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <system_error>
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

int tensorrt_major() { return NV_TENSORRT_MAJOR; }
namespace {
const char* library_stem(TensorRTRuntime kind) { return kind == TensorRTRuntime::lean ? "libnvinfer_lean" : "libnvinfer"; }
}  // namespace

std::string tensorrt_soname(TensorRTRuntime kind) {
  return std::string(library_stem(kind)) + ".so." + std::to_string(NV_TENSORRT_MAJOR);
}

namespace {

namespace fs = std::filesystem;

int major_of(int v) { return v >= 100000 ? v / 10000 : v / 1000; }

// The site-packages folders under a Python prefix: PREFIX/lib/python3.*/{site,dist}-packages.
void add_site_packages(const fs::path& prefix, std::vector<fs::path>& out) {
  std::error_code ec;
  for (fs::directory_iterator it(prefix / "lib", ec), end; !ec && it != end; it.increment(ec))
    if (it->path().filename().string().rfind("python3", 0) == 0)
      for (const char* leaf : {"site-packages", "dist-packages"}) out.push_back(it->path() / leaf);
}

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

}  // namespace

std::vector<std::string> pip_library_dirs(const std::vector<std::string>& folders) {
  std::vector<fs::path> sites;
  // A wheel installs this library inside site-packages (e.g. site-packages/adafuse_export/lib):
  // its ancestors are where pip put the other wheels' libraries beside it.
  Dl_info self{};
  if (dladdr(reinterpret_cast<void*>(&pip_library_dirs), &self) != 0 && self.dli_fname != nullptr) {
    fs::path p = fs::path(self.dli_fname).parent_path();
    for (int up = 0; up < 4 && !p.empty() && p != p.root_path(); ++up, p = p.parent_path()) sites.push_back(p);
  }
  for (const char* prefix : {"VIRTUAL_ENV", "CONDA_PREFIX"})
    if (const char* v = env(prefix)) add_site_packages(v, sites);
  if (const char* v = env("PYTHONPATH")) {
    std::string list = v;
    for (size_t start = 0, colon; start <= list.size(); start = colon + 1) {
      colon = list.find(':', start);
      if (colon == std::string::npos) colon = list.size();
      if (colon > start) sites.push_back(list.substr(start, colon - start));
    }
  }
  if (const char* home = env("HOME")) add_site_packages(fs::path(home) / ".local", sites);
  add_site_packages("/usr/local", sites);
  sites.push_back("/usr/lib/python3/dist-packages");
  std::vector<std::string> dirs;
  for (const auto& site : sites)
    for (const std::string& folder : folders) {
      std::error_code ec;
      const fs::path dir = fs::weakly_canonical(site / folder, ec);
      if (!ec && fs::is_directory(dir, ec) && std::find(dirs.begin(), dirs.end(), dir.string()) == dirs.end())
        dirs.push_back(dir.string());
    }
  return dirs;
}

std::vector<std::string> pip_tensorrt_dirs(TensorRTRuntime kind) {
  if (kind == TensorRTRuntime::lean) return pip_library_dirs({"tensorrt_lean_libs", "tensorrt_libs"});
  return pip_library_dirs({"tensorrt_libs"});
}

TensorRTLibrary open_tensorrt(const std::string& path, TensorRTRuntime kind) {
  const bool lean = kind == TensorRTRuntime::lean;
  const std::string soname = tensorrt_soname(kind);
  const std::string want = "TensorRT " + std::to_string(tensorrt_major()) + ".x (" + soname + ")";
  std::vector<std::string> names{path};
  if (path.empty()) {
    names = {soname, std::string(library_stem(kind)) + ".so"};
    for (const auto& dir : pip_tensorrt_dirs(kind)) names.push_back(dir + "/" + soname);
  }
  std::string tried, errors;
  for (const auto& name : names) {
    tried += (tried.empty() ? "" : ", ") + name;
    dlerror();
    void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      errors += (errors.empty() ? "" : "; ") + std::string(why ? why : name.c_str());
      continue;
    }
    TensorRTLibrary lib{SharedLibrary(handle, name), 0, "", kind};
    using VersionFn = int32_t (*)();
    auto get_version = reinterpret_cast<VersionFn>(lib.library.symbol("getInferLibVersion"));
    if (get_version == nullptr || lib.library.symbol("createInferRuntime_INTERNAL") == nullptr)
      fail(ADAFUSE_ERR_TENSORRT, name + ": not a TensorRT runtime library (no getInferLibVersion / "
                                        "createInferRuntime_INTERNAL); this runtime needs " + want);
    lib.version = get_version();
    lib.version_text = version_text(lib.version);
    const int major = major_of(lib.version);
    if (major < tensorrt_major())
      fail(ADAFUSE_ERR_TENSORRT, name + ": TensorRT " + lib.version_text + " is too old; this runtime needs " + want);
    if (major > tensorrt_major())
      fail(ADAFUSE_ERR_TENSORRT, name + ": TensorRT " + lib.version_text + " is newer than this runtime was built for; it needs " +
                                     want + "; TensorRT " + std::to_string(major) + " needs a runtime built against its headers");
    return lib;
  }
  const std::string major = std::to_string(tensorrt_major());
  if (lean)
    fail(ADAFUSE_ERR_TENSORRT, "TensorRT lean runtime not found: a version-compatible engine needs TensorRT " + major +
                                   ".x's lean runtime (tried " + tried + ": " + errors + "); install it (pip install " +
                                   "tensorrt-lean-cu12-libs==" + major + ".* or tensorrt-lean-cu13-libs==" + major +
                                   ".*, the engine's version) or pass its libnvinfer_lean.so path");
  fail(ADAFUSE_ERR_TENSORRT, "TensorRT not found: this runtime needs TensorRT " + major + ".x (tried " + tried + ": " + errors +
                                 "); install it (pip install tensorrt-cu12==" + major + ".* or tensorrt-cu13==" + major +
                                 ".*) or pass its libnvinfer.so path");
}

void check_engine_tensorrt_version(const std::string& engine, const std::string& recorded, const TensorRTLibrary& trt) {
  int major = -1, minor = -1, patch = -1;
  char rest = 0;
  // "10.14.1" or "10.14.1.48": the build number does not change the engine format.
  const int n = std::sscanf(recorded.c_str(), "%d.%d.%d%c", &major, &minor, &patch, &rest);
  if (n < 3 || (n == 4 && rest != '.'))
    fail(ADAFUSE_ERR_TENSORRT, engine + ": its manifest does not say which TensorRT built it (engine.backend_version '" + recorded +
                                   "'); convert it again");
  const int v = trt.version;
  const std::string built = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
  if (major == major_of(v) && minor == (v / 100) % 100 && patch == v % 100) return;
  if (trt.kind == TensorRTRuntime::lean)
    fail(ADAFUSE_ERR_TENSORRT, engine + ": version-compatible engine built with TensorRT " + recorded + ", but " +
                                   trt.library.path() + " is the lean runtime of TensorRT " + trt.version_text +
                                   "; its plan leaves the lean runtime out, so it runs on the lean runtime of the TensorRT that "
                                   "built it (load TensorRT " + built + "'s libnvinfer_lean, or convert it again with this one)");
  fail(ADAFUSE_ERR_TENSORRT, engine + ": built with TensorRT " + recorded + ", but " + trt.library.path() + " is TensorRT " +
                                 trt.version_text + "; an engine runs only on the TensorRT that built it (load TensorRT " + built +
                                 ", or convert it again with this one)");
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
  // A plugin library built for another TensorRT major would hand TensorRT objects of another layout.
  using MajorFn = int32_t (*)();
  if (auto built_for = reinterpret_cast<MajorFn>(lib.symbol("adafuse_plugin_tensorrt_major")))
    if (const int major = built_for(); major != tensorrt_major())
      fail(ADAFUSE_ERR_PLUGIN, path + ": plugin library built for TensorRT " + std::to_string(major) + ", this runtime for TensorRT " +
                                   std::to_string(tensorrt_major()) + "; use the plugin library built with this runtime");
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
