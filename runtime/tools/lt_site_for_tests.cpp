// libadafuse_lt_site_for_tests.so: one projection with its routed LoRA term through the native backend's cuBLASLt
// path (lt_lora.h), for tests/gpu/test_native_cublaslt.py to compare with a float64 reference on random inputs.
// Not installed. The scratch (t, z, B_cat, the workspace) is allocated per call here; the backend plans its own.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

#include "error.h"
#include "lt_lora.h"
#include "native_mix.h"
#include "native_plan.h"

namespace {

struct Device {  // cudaMalloc'd bytes, freed on every path out
  void* ptr = nullptr;
  ~Device() {
    if (ptr) cudaFree(ptr);
  }
};

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) adafuse::fail(ADAFUSE_ERR_CUDA, std::string(what) + ": " + cudaGetErrorString(status));
}

}  // namespace

// dtype 1 float16, 2 bfloat16; device pointers as lt_lora.h's LtLoraCall, B [E, out, rank] (A == B == null: no
// adapter). Returns 0 when y is written, 1 when cuBLASLt offered no algorithm, -1 on an error (message copied).
extern "C" __attribute__((visibility("default"))) int adafuse_lt_site_for_tests(
    int dtype, int64_t rows, int64_t in, int64_t out, const void* x, const void* W, const void* bias, const void* A,
    const void* B, int64_t experts, int64_t rank, const int32_t* ids, const float* gates, int64_t top_k, void* y,
    char* message, size_t message_bytes) {
  try {
    const size_t elt = 2, width = static_cast<size_t>(experts * rank);
    Device workspace, t, z, b_cat;
    check(cudaMalloc(&workspace.ptr, adafuse::kNativeCublasLtWorkspace), "cudaMalloc");
    adafuse::LtLoraCall c;
    c.dtype = dtype;
    c.rows = rows;
    c.in = in;
    c.out = out;
    c.x = x;
    c.W = W;
    c.bias = bias;
    c.y = y;
    if (A != nullptr) {
      check(cudaMalloc(&t.ptr, std::max<size_t>(1, static_cast<size_t>(rows) * width * 4)), "cudaMalloc");
      check(cudaMalloc(&z.ptr, std::max<size_t>(1, static_cast<size_t>(rows) * width * elt)), "cudaMalloc");
      check(cudaMalloc(&b_cat.ptr, std::max<size_t>(1, static_cast<size_t>(out) * width * elt)), "cudaMalloc");
      check(adafuse::lora_concat_b(dtype, static_cast<int32_t>(experts), out, static_cast<int32_t>(rank), B, b_cat.ptr, nullptr),
            "lora_concat_b");
      c.A = A;
      c.b_cat = b_cat.ptr;
      c.experts = experts;
      c.rank = rank;
      c.top_k = top_k;
      c.ids = ids;
      c.gates = gates;
      c.t = static_cast<float*>(t.ptr);
      c.z = z.ptr;
    }
    adafuse::LtGemms gemms(adafuse::CublasLt::load(), workspace.ptr, adafuse::kNativeCublasLtWorkspace);
    const bool done = adafuse::lt_lora_linear(gemms, c, nullptr, "test site (" + std::to_string(rows) + " rows)");
    check(cudaDeviceSynchronize(), "test site");
    return done ? 0 : 1;
  } catch (const std::exception& e) {
    std::snprintf(message, message_bytes, "%s", e.what());
    return -1;
  }
}
