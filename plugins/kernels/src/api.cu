// api.cu - status strings, ABI version and device look-ups.
#include "common.cuh"

#include <atomic>

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
