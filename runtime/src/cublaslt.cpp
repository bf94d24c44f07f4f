#include "cublaslt.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "error.h"

namespace adafuse {

namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

std::string soname() { return "libcublasLt.so." + std::to_string(cublaslt_major()); }

template <typename Fn>
void resolve(const SharedLibrary& lib, const char* name, Fn& out, std::string& missing) {
  out = reinterpret_cast<Fn>(lib.symbol(name));
  if (out == nullptr) missing += (missing.empty() ? "" : ", ") + std::string(name);
}

// cublasLtGetVersion(): major * 10000 + minor * 100 + patch (CUBLAS_VERSION of CUDA 12 and 13); CUDA 11's was
// major * 1000 + minor * 100 + patch.
size_t major_of(size_t v) { return v >= 100000 ? v / 10000 : v / 1000; }
std::string version_text(size_t v) {
  return std::to_string(major_of(v)) + "." + std::to_string(v >= 100000 ? v / 100 % 100 : v / 100 % 10) + "." +
         std::to_string(v % 100);
}

// The largest power of two (at most 256) dividing the address: cuBLASLt's heuristic assumes 256-byte
// aligned operands unless told otherwise, and an algorithm chosen so may refuse a less aligned one.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

}  // namespace

int cublaslt_major() { return CUDART_VERSION / 1000; }

std::vector<std::string> cublaslt_candidates() {
  if (const char* path = env("ADAFUSE_CUBLASLT_LIB")) return {path};
  std::vector<std::string> out{soname()};  // the loader's path: LD_LIBRARY_PATH, ldconfig's cache, RUNPATH
  if (const char* home = env("CUDA_HOME")) out.push_back(std::string(home) + "/lib64/" + soname());
  out.push_back("/usr/local/cuda/lib64/" + soname());
  // pip's wheels: nvidia-cublas (CUDA 13: nvidia/cu13/lib) and nvidia-cublas-cu12 (nvidia/cublas/lib); the
  // major check in load_from refuses one of another CUDA major than this build's.
  const std::string major = std::to_string(cublaslt_major());
  for (const std::string& dir : pip_library_dirs({"nvidia/cu" + major + "/lib", "nvidia/cublas/lib"}))
    out.push_back(dir + "/" + soname());
  return out;
}

std::shared_ptr<const CublasLt> CublasLt::load_from(const std::string& path) {
  dlerror();
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    fail(ADAFUSE_ERR_CUDA, "cuBLASLt: cannot load " + path + ": " + (why ? why : "dlopen failed"));
  }
  SharedLibrary lib(handle, path);
  lt::Entry api;
  std::string missing;
  resolve(lib, "cublasLtGetVersion", api.get_version, missing);
  resolve(lib, "cublasLtGetStatusString", api.get_status_string, missing);
  resolve(lib, "cublasLtCreate", api.create, missing);
  resolve(lib, "cublasLtDestroy", api.destroy, missing);
  resolve(lib, "cublasLtMatmul", api.matmul, missing);
  resolve(lib, "cublasLtMatmulDescCreate", api.desc_create, missing);
  resolve(lib, "cublasLtMatmulDescDestroy", api.desc_destroy, missing);
  resolve(lib, "cublasLtMatmulDescSetAttribute", api.desc_set, missing);
  resolve(lib, "cublasLtMatrixLayoutCreate", api.layout_create, missing);
  resolve(lib, "cublasLtMatrixLayoutDestroy", api.layout_destroy, missing);
  resolve(lib, "cublasLtMatmulPreferenceCreate", api.pref_create, missing);
  resolve(lib, "cublasLtMatmulPreferenceDestroy", api.pref_destroy, missing);
  resolve(lib, "cublasLtMatmulPreferenceSetAttribute", api.pref_set, missing);
  resolve(lib, "cublasLtMatmulAlgoGetHeuristic", api.get_heuristic, missing);
  if (!missing.empty()) fail(ADAFUSE_ERR_CUDA, "cuBLASLt: " + path + " is not a cuBLASLt library (no " + missing + ")");
  const size_t version = api.get_version();
  // The declarations in cublaslt_api.h are those of one major; another major's library is not trusted.
  if (major_of(version) != static_cast<size_t>(cublaslt_major()))
    fail(ADAFUSE_ERR_CUDA, "cuBLASLt: " + path + " is version " + version_text(version) + "; this runtime is built for CUDA " +
                               std::to_string(cublaslt_major()) + " and needs cuBLASLt " + std::to_string(cublaslt_major()) +
                               ".x (" + soname() + ")");
  return std::shared_ptr<const CublasLt>(new CublasLt(std::move(lib), api, version));
}

std::shared_ptr<const CublasLt> CublasLt::load() {
  static std::mutex mutex;
  static std::map<std::string, std::shared_ptr<const CublasLt>> loaded;  // by the override in force ("" none)
  std::lock_guard<std::mutex> lock(mutex);
  const char* override_path = env("ADAFUSE_CUBLASLT_LIB");
  std::shared_ptr<const CublasLt>& cached = loaded[override_path ? override_path : ""];
  if (cached) return cached;
  const bool chosen = override_path != nullptr;
  std::string errors;
  for (const std::string& path : cublaslt_candidates()) {
    try {
      cached = load_from(path);
      return cached;
    } catch (const Error& e) {
      // A library that loads but is wrong is not skipped silently; one that is absent is.
      if (chosen || std::string(e.what()).find("cannot load") == std::string::npos)
        fail(ADAFUSE_ERR_CUDA, std::string(e.what()) + (chosen ? " (ADAFUSE_CUBLASLT_LIB)" : ""));
      errors += (errors.empty() ? "" : ", ") + path;
    }
  }
  fail(ADAFUSE_ERR_CUDA, "cuBLASLt: " + soname() + " not found (tried " + errors +
                             "; install pip's nvidia-cublas" + (cublaslt_major() == 12 ? std::string("-cu12") : std::string()) +
                             " or set ADAFUSE_CUBLASLT_LIB to its path)");
}

std::string CublasLt::status_text(lt::Status status) const {
  const char* text = api_.get_status_string(status);
  return (text ? std::string(text) : std::string("cuBLAS status")) + " (" + std::to_string(status) + ")";
}

GemmChoice native_gemm_choice() {
  const char* v = env("ADAFUSE_NATIVE_GEMM");
  const std::string value = v ? v : "auto";
  if (value == "auto") return GemmChoice::automatic;
  if (value == "cublaslt") return GemmChoice::cublaslt;
  if (value == "kernels") return GemmChoice::kernels;
  fail(ADAFUSE_ERR_INVALID_ARGUMENT, "ADAFUSE_NATIVE_GEMM '" + value + "' is unknown (expected auto, cublaslt or kernels)");
}

std::shared_ptr<const CublasLt> native_cublaslt(const std::string& dtype, std::string* missing) {
  const GemmChoice choice = native_gemm_choice();  // checked whatever the dtype: a typo is never silent
  if (dtype == "float32" || choice == GemmChoice::kernels) return nullptr;
  try {
    return CublasLt::load();
  } catch (const Error& e) {
    if (choice == GemmChoice::cublaslt) fail(e.status(), std::string(e.what()) + " (ADAFUSE_NATIVE_GEMM=cublaslt requires it)");
    if (missing) *missing = e.what();
    return nullptr;
  }
}

LtGemms::LtGemms(std::shared_ptr<const CublasLt> lib, void* workspace, size_t workspace_bytes)
    : lib_(std::move(lib)), workspace_(workspace), workspace_bytes_(workspace_bytes) {
  if (!lib_ || workspace_ == nullptr || workspace_bytes_ == 0)
    fail(ADAFUSE_ERR_INTERNAL, "LtGemms: a library and a workspace are required");
  check(lib_->api().create(&handle_), "cuBLASLt", "cublasLtCreate");
}

void LtGemms::release(Plan& p) const {
  const lt::Entry& api = lib_->api();
  if (p.desc) api.desc_destroy(p.desc);
  for (lt::MatrixLayout l : {p.a, p.b, p.d})
    if (l) api.layout_destroy(l);
  p = Plan{};
}

LtGemms::~LtGemms() {
  for (auto& [key, p] : plans_) release(p);
  if (handle_) lib_->api().destroy(handle_);
}

void LtGemms::check(lt::Status status, const std::string& what, const char* call) const {
  if (status != lt::kStatusSuccess) fail(ADAFUSE_ERR_CUDA, what + ": " + call + ": " + lib_->status_text(status));
}

LtGemms::Plan& LtGemms::plan(const LtGemm& g, const Key& key, const std::string& what) {
  auto found = plans_.find(key);
  if (found != plans_.end()) return found->second;
  Plan p;
  try {
    make_plan(g, p, what);
  } catch (...) {  // a failed call: nothing kept, the next call of this shape tries (and says) again
    release(p);
    throw;
  }
  return plans_.emplace(key, p).first->second;
}

void LtGemms::make_plan(const LtGemm& g, Plan& p, const std::string& what) {
  const lt::Entry& api = lib_->api();
  // Column-major view of the row-major problem: D^T [m, n] = W [m, k] (W^T stored, op T) times X^T [k, n].
  check(api.desc_create(&p.desc, lt::kCompute32F, CUDA_R_32F), what, "cublasLtMatmulDescCreate");
  const int32_t op_t = lt::kOpT, op_n = lt::kOpN;
  const uint32_t epilogue = static_cast<uint32_t>(g.bias ? lt::kEpilogueBias : lt::kEpilogueDefault);
  check(api.desc_set(p.desc, lt::kDescTransA, &op_t, sizeof op_t), what, "cublasLtMatmulDescSetAttribute(TRANSA)");
  check(api.desc_set(p.desc, lt::kDescTransB, &op_n, sizeof op_n), what, "cublasLtMatmulDescSetAttribute(TRANSB)");
  check(api.desc_set(p.desc, lt::kDescEpilogue, &epilogue, sizeof epilogue), what, "cublasLtMatmulDescSetAttribute(EPILOGUE)");
  if (g.bias)
    check(api.desc_set(p.desc, lt::kDescBiasPointer, &g.bias, sizeof g.bias), what, "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  check(api.layout_create(&p.a, g.in_type, u(g.k), u(g.m), g.k), what, "cublasLtMatrixLayoutCreate(W)");
  check(api.layout_create(&p.b, g.in_type, u(g.k), u(g.n), g.k), what, "cublasLtMatrixLayoutCreate(X)");
  check(api.layout_create(&p.d, g.out_type, u(g.m), u(g.n), g.m), what, "cublasLtMatrixLayoutCreate(D)");

  lt::Preference pref = nullptr;
  check(api.pref_create(&pref), what, "cublasLtMatmulPreferenceCreate");
  struct PrefOwner {
    const lt::Entry& api;
    lt::Preference pref;
    ~PrefOwner() { api.pref_destroy(pref); }
  } owner{api, pref};
  const uint64_t max_ws = workspace_bytes_;
  const uint32_t align_a = alignment(g.W), align_b = alignment(g.X), align_d = alignment(g.D);
  check(api.pref_set(pref, lt::kPrefMaxWorkspaceBytes, &max_ws, sizeof max_ws), what, "cublasLtMatmulPreferenceSetAttribute");
  check(api.pref_set(pref, lt::kPrefMinAlignmentA, &align_a, sizeof align_a), what, "cublasLtMatmulPreferenceSetAttribute");
  check(api.pref_set(pref, lt::kPrefMinAlignmentB, &align_b, sizeof align_b), what, "cublasLtMatmulPreferenceSetAttribute");
  check(api.pref_set(pref, lt::kPrefMinAlignmentC, &align_d, sizeof align_d), what, "cublasLtMatmulPreferenceSetAttribute");
  check(api.pref_set(pref, lt::kPrefMinAlignmentD, &align_d, sizeof align_d), what, "cublasLtMatmulPreferenceSetAttribute");
  lt::HeuristicResult result{};
  int found_count = 0;
  const lt::Status status = api.get_heuristic(handle_, p.desc, p.a, p.b, p.d, p.d, pref, 1, &result, &found_count);
  p.usable = status == lt::kStatusSuccess && found_count > 0 && result.state == lt::kStatusSuccess &&
             result.workspaceSize <= workspace_bytes_;
  if (p.usable) {
    p.algo = result.algo;
  } else {
    std::fprintf(stderr, "[adafuse] %s: cuBLASLt offers no algorithm (%s); the kernel library's GEMM runs it\n", what.c_str(),
                 status != lt::kStatusSuccess ? lib_->status_text(status).c_str() : "none returned");
  }
}

bool LtGemms::run(const LtGemm& g, cudaStream_t stream, const std::string& what) {
  const Key key{static_cast<int>(g.in_type), static_cast<int>(g.out_type), g.m, g.n, g.k, g.bias != nullptr, g.accumulate,
                alignment(g.W), alignment(g.X), alignment(g.D), g.bias ? alignment(g.bias) : 0u};
  Plan& p = plan(g, key, what);
  if (!p.usable) return false;
  const lt::Entry& api = lib_->api();
  if (g.bias)  // the plan may have been made for another bias of the same shape
    check(api.desc_set(p.desc, lt::kDescBiasPointer, &g.bias, sizeof g.bias), what, "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  static const float one = 1.0f, zero = 0.0f;
  check(api.matmul(handle_, p.desc, &one, g.W, p.a, g.X, p.b, g.accumulate ? &one : &zero, g.D, p.d, g.D, p.d, &p.algo,
                   workspace_, workspace_bytes_, stream),
        what, "cublasLtMatmul");
  return true;
}

}  // namespace adafuse
