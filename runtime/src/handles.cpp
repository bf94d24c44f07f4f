#include "handles.h"

#include <mutex>
#include <string>
#include <unordered_map>

#include "error.h"

namespace adafuse::handles {
namespace {

std::mutex mutex;
std::unordered_map<const void*, Kind>& registry() {
  static auto* map = new std::unordered_map<const void*, Kind>();  // never destroyed: frees may run at exit
  return *map;
}

const char* maker(Kind kind) {
  switch (kind) {
    case Kind::manifest: return "adafuse_manifest_open";
    case Kind::routes: return "adafuse_routes_open";
    case Kind::sampler: return "adafuse_sampler_create";
    case Kind::engine: return "adafuse_engine_open";
  }
  return "?";
}

}  // namespace

void add(const void* handle, Kind kind) {
  std::lock_guard<std::mutex> lock(mutex);
  registry()[handle] = kind;
}

bool valid(const void* handle, Kind kind) {
  if (handle == nullptr) return false;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = registry().find(handle);
  return it != registry().end() && it->second == kind;
}

bool remove(const void* handle, Kind kind) {
  if (handle == nullptr) return false;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = registry().find(handle);
  if (it == registry().end() || it->second != kind) return false;
  registry().erase(it);
  return true;
}

void check(const void* handle, Kind kind, const char* name) {
  if (handle == nullptr) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string(name) + ": NULL pointer");
  if (!valid(handle, kind))
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string(name) + ": not a live handle from " + maker(kind) +
                                           " (freed already, or not made by this library)");
}

}  // namespace adafuse::handles
