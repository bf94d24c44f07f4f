// cuBLASLt opened at run time (dlopen), so the runtime builds, loads and passes its CPU tests where no
// cuBLAS exists; the native backend's GEMMs of many rows run through it where it loads (native_step.cpp).
// The library: $ADAFUSE_CUBLASLT_LIB (a path, and nothing else then), else libcublasLt.so.<the CUDA major
// this runtime is built with> from the loader's path, $CUDA_HOME/lib64, /usr/local/cuda/lib64, then pip's wheels
// (pip_library_dirs: each site-packages' nvidia/cu<major>/lib, then nvidia/cublas/lib, the CUDA 12 layout).
// ADAFUSE_NATIVE_GEMM: "auto" (unset: cuBLASLt where it loads, else the kernel library, said once on
// stderr), "cublaslt" (required: opening fails without it), "kernels" (never cuBLASLt).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "cublaslt_api.h"
#include "tensorrt_library.h"  // SharedLibrary

namespace adafuse {

int cublaslt_major();                            // the CUDA major of this build (CUDART_VERSION / 1000)
std::vector<std::string> cublaslt_candidates();  // the places tried, in order

class CublasLt {
 public:
  // The process's library (loaded on first use, then shared; per value of ADAFUSE_CUBLASLT_LIB); throws
  // Error(ADAFUSE_ERR_CUDA) naming every place tried, or a library without the entry points or of another major.
  static std::shared_ptr<const CublasLt> load();
  // One path, not cached (tests).
  static std::shared_ptr<const CublasLt> load_from(const std::string& path);

  const lt::Entry& api() const { return api_; }
  const std::string& path() const { return lib_.path(); }
  size_t version() const { return version_; }  // major * 10000 + minor * 100 + patch
  std::string status_text(lt::Status status) const;

 private:
  CublasLt(SharedLibrary lib, lt::Entry api, size_t version) : lib_(std::move(lib)), api_(api), version_(version) {}
  SharedLibrary lib_;
  lt::Entry api_;
  size_t version_ = 0;
};

enum class GemmChoice { automatic, cublaslt, kernels };
GemmChoice native_gemm_choice();  // ADAFUSE_NATIVE_GEMM; an unknown value is refused in one line

// The native backend's cuBLASLt for an artifact of `dtype` (its open and adafuse-native-check's plan decide alike):
// the library, or null for float32, ADAFUSE_NATIVE_GEMM=kernels, or (auto) a library that did not load, whose
// reason goes to *missing. Throws when the choice is unknown, or cublaslt and the library did not load.
std::shared_ptr<const CublasLt> native_cublaslt(const std::string& dtype, std::string* missing);

// Row-major D [n, m] = X [n, k] W [m, k]^T (+ bias [m]) (+ D when accumulate), fp32 accumulation,
// rounded once to D's type. X, W and bias share a type (16-bit); D is that type or float32.
struct LtGemm {
  cudaDataType_t in_type = CUDA_R_16BF, out_type = CUDA_R_16BF;
  int64_t m = 0, n = 0, k = 0;
  const void* X = nullptr;
  const void* W = nullptr;
  const void* bias = nullptr;
  void* D = nullptr;
  bool accumulate = false;
};

// One handle, its workspace (the caller's, allocated once: CUDA-graph capture must not allocate) and the
// plan of every GEMM shape seen: descriptors and the heuristic's algorithm, chosen once per (shape, rows,
// pointer alignments) and kept, since an algorithm is only promised for the problem it was chosen for.
class LtGemms {
 public:
  LtGemms(std::shared_ptr<const CublasLt> lib, void* workspace, size_t workspace_bytes);
  ~LtGemms();
  LtGemms(const LtGemms&) = delete;
  LtGemms& operator=(const LtGemms&) = delete;

  // Enqueues the GEMM; false: cuBLASLt offers no algorithm for it (said once on stderr; the caller runs
  // its own). A failed call throws Error(ADAFUSE_ERR_CUDA) starting with `what`.
  bool run(const LtGemm& g, cudaStream_t stream, const std::string& what);
  const CublasLt& library() const { return *lib_; }

 private:
  struct Plan {
    lt::MatmulDesc desc = nullptr;
    lt::MatrixLayout a = nullptr, b = nullptr, d = nullptr;
    lt::MatmulAlgo algo{};
    bool usable = false;
  };
  using Key = std::tuple<int, int, int64_t, int64_t, int64_t, bool, bool, uint32_t, uint32_t, uint32_t, uint32_t>;
  Plan& plan(const LtGemm& g, const Key& key, const std::string& what);  // found, or made and kept
  void make_plan(const LtGemm& g, Plan& p, const std::string& what);     // descriptors, then the heuristic's choice
  void release(Plan& p) const;
  void check(lt::Status status, const std::string& what, const char* call) const;

  std::shared_ptr<const CublasLt> lib_;
  lt::Handle handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, Plan> plans_;
};

}  // namespace adafuse
