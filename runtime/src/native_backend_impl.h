// The native backend's class, shared by native_backend.cpp (open: plan, allocation, upload) and
// native_step.cpp (the step: every kernel of prefill and decode, CUDA graphs, outputs).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_runtime_api.h>

#include <cstring>

#include "error.h"

#include "backend.h"
#include "cublaslt.h"
#include "kernels_api.h"
#include "native_artifact.h"
#include "native_plan.h"

namespace adafuse::native_detail {

namespace kl = adafuse::kernels;

inline void cuda_check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) fail(ADAFUSE_ERR_CUDA, what + ": " + cudaGetErrorString(status));
}

// After a failure: whether the context is lost (a sticky error every later call returns again).
inline bool cuda_context_lost() {
  cudaGetLastError();
  return cudaDeviceSynchronize() != cudaSuccess;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: mant * 2^-24
      const float f = static_cast<float>(mant) * 0x1.0p-24f;
      return (h & 0x8000u) ? -f : f;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}


// Owners of the device block, the pinned host buffers and the stream (freed also when the constructor throws).
struct DeviceMemory {
  void* ptr = nullptr;
  ~DeviceMemory() {
    if (ptr) cudaFree(ptr);
  }
};
struct PinnedMemory {
  void* ptr = nullptr;
  ~PinnedMemory() {
    if (ptr) cudaFreeHost(ptr);
  }
};
struct Stream {
  cudaStream_t stream = nullptr;
  ~Stream() {
    if (stream) cudaStreamDestroy(stream);
  }
};
struct Event {
  cudaEvent_t event = nullptr;
  ~Event() {
    if (event) cudaEventDestroy(event);
  }
};

// One sequence's part of a step, with where its outputs go on the host.
struct Row {
  int32_t slot = 0, start = 0, count = 1;
  bool all_logits = false;
  int32_t reach = 0;      // the largest position of the call + 1 (LongRoPE's choice of frequencies)
  float* logits = nullptr;  // [count or 1, vocab]
  int32_t* expert_ids = nullptr;  // [count, top_k] or null
  float* gates = nullptr;
};

struct RoleOut {
  void* ptr;
  long long ld;
};

class NativeBackend final : public Backend {
 public:
  NativeBackend(const NativeArtifact& artifact, const adafuse_open_options& options, const std::string& strategy);
  ~NativeBackend() override;
  NativeBackend(const NativeBackend&) = delete;
  NativeBackend& operator=(const NativeBackend&) = delete;
  const BackendInfo& info() const override { return info_; }
  double last_step_gpu_ms() const override { return last_gpu_ms_; }

 protected:
  void do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits, int32_t* expert_ids,
                  float* gates) override;
  void do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) override;
  void do_step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids,
               float* gates) override;
  void do_read_kv(int32_t layer, bool value, float* out) const override;

 private:
  struct Shape {
    int32_t tokens = 0, rows = 0, max_count = 0, logit_rows = 0;
    bool merged = false;  // switch: the token's experts are merged into the live weights
  };
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    int seen = 0;
  };

  char* at(const std::string& name) const { return base_ + plan_.at(name).offset; }
  const void* weight(const std::string& name) const { return at("w:" + name); }
  void upload();
  void init_tables();
  void set_device() const;
  void run(const int64_t* ids, std::vector<Row>& rows);
  Shape prepare(const int64_t* ids, const std::vector<Row>& rows);
  void enqueue_body(const Shape& s);
  void enqueue_head(int32_t first, int32_t count);
  void project(size_t layer, int stage, const void* x, int32_t rows, const int32_t* ids, const float* gates, bool merged);
  RoleOut role(size_t layer, int stage, const std::string& name, int32_t rows) const;
  // wscale: W's per-output-channel scales when W is FP8 (an artifact with fp8_weights), else nullptr.
  void lora(size_t site, int32_t rows, const void* x, const void* W, const float* wscale, const void* bias, const void* A,
            const void* B, const int32_t* ids, const float* gates, void* y);
  // lora through cuBLASLt (16-bit W, more than kNativeFewRows rows); false: not for this call (lora runs the kernel library).
  bool lt_lora(size_t site, int32_t rows, const void* x, const void* W, const void* bias, const void* A, const int32_t* ids,
               const float* gates, void* y);
  const void* site_lora_b(const NativeSite& s) const;
  void norm(void* h, const void* delta, const std::string& weight_name, void* out, int32_t rows);
  void switch_now();
  void capture(Graph& graph, const Shape& s);
  void check(cudaError_t status, const std::string& what);
  void kcheck(int status, const std::string& what);
  [[noreturn]] void device_failure(const std::string& message);

  NativeArtifact a_;
  NativePlan plan_;
  NativeInputLayout inputs_;
  std::vector<NativeSite> sites_;
  std::map<std::tuple<int64_t, int64_t, int64_t>, size_t> site_index_;  // (layer, stage, module) -> sites_
  BackendInfo info_;
  int device_ = 0;
  bool graphs_enabled_ = true, switch_ = false, capturing_ = false;
  kl::adafuse_dtype dtype_ = kl::ADAFUSE_FLOAT32;
  kl::adafuse_norm_kind norm_kind_ = kl::ADAFUSE_NORM_RMS;
  int32_t switch_sites_ = 0, switch_max_out_ = 0, switch_max_in_ = 0;
  Stream stream_;  // declared before the memory: destroyed after it
  Event step_begin_, step_end_;  // around each step's GPU work: last_step_gpu_ms
  double last_gpu_ms_ = -1.0;
  DeviceMemory block_;
  PinnedMemory host_inputs_;
  char* base_ = nullptr;
  std::unique_ptr<LtGemms> lt_;      // null: every GEMM runs the kernel library's (no cuBLASLt, float32, or ADAFUSE_NATIVE_GEMM=kernels)
  std::map<int32_t, Graph> graphs_;  // decode steps by row count
  std::vector<float*> logit_dest_;   // per logit row of the step: where it goes on the host
};


}  // namespace adafuse::native_detail
