// api.cu - status strings, ABI version and device look-ups.
#include "common.cuh"

#include <atomic>

namespace adafuse {

namespace {
constexpr int kMaxDevices = 64;
struct CachedInfo {
  std::atomic<int> ready{0};
  DeviceInfo info;
};
CachedInfo g_info[kMaxDevices];
}  // namespace

int device_info(DeviceInfo* out) {
  int dev = 0;
  AF_CUDA_TRY(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices) {
    DeviceInfo d;
    AF_CUDA_TRY(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev));
    AF_CUDA_TRY(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    AF_CUDA_TRY(cudaDeviceGetAttribute(&d.max_smem_optin,
                                       cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    *out = d;
    return ADAFUSE_OK;
  }
  CachedInfo& c = g_info[dev];
  if (!c.ready.load(std::memory_order_acquire)) {
    DeviceInfo d;
    AF_CUDA_TRY(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev));
    AF_CUDA_TRY(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    AF_CUDA_TRY(cudaDeviceGetAttribute(&d.max_smem_optin,
                                       cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    c.info = d;  // benign race: every writer stores the same values
    c.ready.store(1, std::memory_order_release);
  }
  *out = c.info;
  return ADAFUSE_OK;
}

}  // namespace adafuse

extern "C" {

const char* adafuse_status_string(int status) {
  switch (status) {
    case ADAFUSE_OK: return "ok";
    case ADAFUSE_ERR_INVALID_ARGUMENT: return "invalid argument (a size, pointer or dtype is out of range)";
    case ADAFUSE_ERR_WORKSPACE: return "workspace missing or too small";
    case ADAFUSE_ERR_CUDA: return "a CUDA call or kernel launch failed";
    default: return "unknown adafuse status";
  }
}

int adafuse_abi_version(void) { return ADAFUSE_KERNELS_ABI_VERSION; }

}  // extern "C"
