// The C API's handle registry: every handle the library hands out is recorded with its kind until it
// is freed, and every entry point checks the pointer it is given against the registry before using it.
// A garbage, freed or wrong-kind pointer is refused with ADAFUSE_ERR_INVALID_ARGUMENT (or ignored by the
// *_free functions and the void getters) without being dereferenced.
#pragma once

namespace adafuse::handles {

enum class Kind { manifest, routes, sampler, engine };

void add(const void* handle, Kind kind);
// True when `handle` is live and of `kind`.
bool valid(const void* handle, Kind kind);
// Removes a live handle of `kind`; false (and nothing removed) otherwise.
bool remove(const void* handle, Kind kind);
// Refuses (INVALID_ARGUMENT, naming `name` and the function that makes such handles) anything else.
void check(const void* handle, Kind kind, const char* name);

}  // namespace adafuse::handles
