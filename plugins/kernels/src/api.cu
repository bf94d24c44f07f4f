// api.cu - status strings, ABI version, the driver floor and device look-ups.
#include "common.cuh"

#include <stdio.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

namespace adafuse {

namespace {
struct CachedInfo {
  std::atomic<int> ready{0};
  DeviceInfo info;
};
CachedInfo g_info[kMaxDevices];
}  // namespace

namespace {
int query(int dev, DeviceInfo* d) {
  AF_CUDA_TRY(cudaDeviceGetAttribute(&d->sm_count, cudaDevAttrMultiProcessorCount, dev));
  AF_CUDA_TRY(cudaDeviceGetAttribute(&d->cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  AF_CUDA_TRY(cudaDeviceGetAttribute(&d->max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  AF_CUDA_TRY(cudaDeviceGetAttribute(&d->smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  AF_CUDA_TRY(cudaDeviceGetAttribute(&d->reserved_smem_per_block, cudaDevAttrReservedSharedMemoryPerBlock, dev));
  d->device = dev;
  return ADAFUSE_OK;
}
}  // namespace

int stream_device(cudaStream_t stream, int* dev) {
  // The device the work goes to is the stream's (cudaStreamGetDevice, CUDA >= 12.8), not
  // whichever is current. CUDA refuses cudaStreamGetDevice on a capturing stream (and the
  // refusal invalidates the capture; seen on the H200), so under capture it is the current
  // device, which a captured launch has to target anyway.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  AF_CUDA_TRY(cudaStreamIsCapturing(stream, &capture));
  if (capture == cudaStreamCaptureStatusNone) {
    AF_CUDA_TRY(cudaStreamGetDevice(stream, dev));
  } else {
    AF_CUDA_TRY(cudaGetDevice(dev));
  }
  return ADAFUSE_OK;
}

int device_info(cudaStream_t stream, DeviceInfo* out) {
  int dev = 0;
  int st = stream_device(stream, &dev);
  if (st != ADAFUSE_OK) return st;
  if (dev < 0 || dev >= kMaxDevices) return query(dev, out);
  CachedInfo& c = g_info[dev];
  if (!c.ready.load(std::memory_order_acquire)) {
    DeviceInfo d;
    st = query(dev, &d);
    if (st != ADAFUSE_OK) return st;
    c.info = d;  // benign race: every writer stores the same values
    c.ready.store(1, std::memory_order_release);
  }
  *out = c.info;
  return ADAFUSE_OK;
}

int stream_pdl(cudaStream_t stream, Pdl* out) {
  DeviceInfo di;
  const int st = device_info(stream, &di);
  if (st != ADAFUSE_OK) return st;
  *out = pdl_request(di, true);
  return ADAFUSE_OK;
}

namespace {
// Per kernel: bit d of known / yes = device d looked up / compiled for sm_90+ there.
struct PdlBits {
  unsigned long long known = 0, yes = 0;
};
std::mutex g_pdl_mu;
std::unordered_map<const void*, PdlBits> g_pdl_bits;

// cudaFuncGetAttributes answers for the current device: make `device` current for the query.
int query_ptx_version(const void* kern, int device, int* ptx) {
  int current = 0;
  AF_CUDA_TRY(cudaGetDevice(&current));
  if (current != device) AF_CUDA_TRY(cudaSetDevice(device));
  cudaFuncAttributes fa;
  const cudaError_t e = cudaFuncGetAttributes(&fa, kern);
  if (current != device) AF_CUDA_TRY(cudaSetDevice(current));
  AF_CUDA_TRY(e);
  *ptx = fa.ptxVersion;
  return ADAFUSE_OK;
}
}  // namespace

int kernel_has_pdl(const void* kern, int device, bool* out) {
  const bool cached = device >= 0 && device < kMaxDevices;
  const unsigned long long bit = cached ? 1ull << device : 0;
  if (cached) {
    std::lock_guard<std::mutex> lock(g_pdl_mu);
    const auto it = g_pdl_bits.find(kern);
    if (it != g_pdl_bits.end() && (it->second.known & bit)) {
      *out = (it->second.yes & bit) != 0;
      return ADAFUSE_OK;
    }
  }
  int ptx = 0;
  const int st = query_ptx_version(kern, device, &ptx);
  if (st != ADAFUSE_OK) return st;
  // ptxVersion is the virtual architecture the code was compiled from (90 for compute_90): the
  // griddepcontrol instructions exist in it from 90 on.
  *out = ptx >= 90;
  if (cached) {
    std::lock_guard<std::mutex> lock(g_pdl_mu);
    PdlBits& b = g_pdl_bits[kern];
    b.known |= bit;
    if (*out) b.yes |= bit;
  }
  return ADAFUSE_OK;
}

namespace {
// CUDA versions in cudaDriverGetVersion's encoding (1000 * major + 10 * minor).
constexpr int kFloorCuda = 12080;  // cudaStreamGetDevice
int required_driver() {
  const int major_floor = (CUDART_VERSION / 1000) * 1000;  // minor version compatibility
  return major_floor > kFloorCuda ? major_floor : kFloorCuda;
}
// The NVIDIA driver branch that first supports a CUDA version (the floors this code can have).
int driver_branch(int cuda) {
  switch (cuda) {
    case 12080: return 570;
    case 13000: return 580;
    default: return 0;
  }
}
// "12.8" from 12080 (the two parts of cudaDriverGetVersion's encoding).
int ver_major(int v) { return v / 1000; }
int ver_minor(int v) { return v % 1000 / 10; }
}  // namespace

}  // namespace adafuse

extern "C" {

int adafuse_required_driver_version(void) { return adafuse::required_driver(); }

int adafuse_check_driver_version(int driver_version, char* msg, size_t msg_len) {
  using namespace adafuse;
  const int need = required_driver(), built = CUDART_VERSION;
  char branch[48] = "";
  if (driver_branch(need) > 0) snprintf(branch, sizeof(branch), " (NVIDIA driver r%d or newer)", driver_branch(need));
  // snprintf with a zero size writes nothing (msg may then be NULL).
  if (!msg) msg_len = 0;
  // One line: what was found, what this build needs and why (versions as CUDA major.minor).
  if (driver_version <= 0) {
    snprintf(msg, msg_len,
             "no CUDA driver found: the adafuse kernels (built with CUDA %d.%d) need a driver for CUDA >= %d.%d%s",
             ver_major(built), ver_minor(built), ver_major(need), ver_minor(need), branch);
    return ADAFUSE_ERR_NO_DRIVER;
  }
  if (driver_version < need) {
    snprintf(msg, msg_len,
             "CUDA driver too old: it supports CUDA %d.%d, the adafuse kernels (built with CUDA %d.%d) need CUDA "
             ">= %d.%d%s",
             ver_major(driver_version), ver_minor(driver_version), ver_major(built), ver_minor(built),
             ver_major(need), ver_minor(need), branch);
    return ADAFUSE_ERR_DRIVER_TOO_OLD;
  }
  snprintf(msg, msg_len,
           "CUDA driver supports CUDA %d.%d, the adafuse kernels (built with CUDA %d.%d) need CUDA >= %d.%d",
           ver_major(driver_version), ver_minor(driver_version), ver_major(built), ver_minor(built),
           ver_major(need), ver_minor(need));
  return ADAFUSE_OK;
}

int adafuse_check_runtime(char* msg, size_t msg_len) {
  int driver = 0;
  const cudaError_t e = cudaDriverGetVersion(&driver);
  if (e != cudaSuccess) {
    if (msg) snprintf(msg, msg_len, "cannot query the CUDA driver version: %s", cudaGetErrorString(e));
    (void)cudaGetLastError();
    return ADAFUSE_ERR_CUDA;
  }
  return adafuse_check_driver_version(driver, msg, msg_len);
}

const char* adafuse_status_string(int status) {
  switch (status) {
    case ADAFUSE_OK: return "ok";
    case ADAFUSE_ERR_INVALID_ARGUMENT: return "invalid argument (a size, pointer or dtype is out of range)";
    case ADAFUSE_ERR_WORKSPACE: return "workspace missing or too small";
    case ADAFUSE_ERR_CUDA: return "a CUDA call or kernel launch failed";
    case ADAFUSE_ERR_NO_DRIVER: return "no CUDA driver found";
    case ADAFUSE_ERR_DRIVER_TOO_OLD: return "the CUDA driver is older than this build of the kernels needs";
    default: return "unknown adafuse status";
  }
}

int adafuse_abi_version(void) { return ADAFUSE_KERNELS_ABI_VERSION; }

}  // extern "C"
