// cuBLASLt opened at run time (cublaslt.h) where there is none: the places searched, the refusals of a missing,
// incomplete or other-major library in one line, and ADAFUSE_NATIVE_GEMM. Stand-in libraries: cublaslt_stub.cpp.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "cublaslt.h"
#include "error.h"
#include "lt_lora.h"

namespace adafuse {
namespace {

class ScopedEnv {  // sets (or unsets) a variable for one test, then puts the old value back
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) setenv(name_, old_->c_str(), 1);
    else unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

std::string refusal(const std::string& path) {
  try {
    CublasLt::load_from(path);
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), ADAFUSE_ERR_CUDA);
    return e.what();
  }
  return "loaded";
}

TEST(CublasLt, SearchesTheOverrideAloneElseTheSonameOfThisBuildsCudaMajor) {
  const std::string so = "libcublasLt.so." + std::to_string(cublaslt_major());
  EXPECT_EQ(cublaslt_major(), CUDART_VERSION / 1000);
  {
    ScopedEnv lib("ADAFUSE_CUBLASLT_LIB", "/opt/lt/libcublasLt.so.13.1");
    EXPECT_EQ(cublaslt_candidates(), std::vector<std::string>{"/opt/lt/libcublasLt.so.13.1"});
  }
  ScopedEnv lib("ADAFUSE_CUBLASLT_LIB", nullptr);
  // The system's places first; after them come pip's wheels this machine may have (FindsPipsWheels...).
  const auto first = [](size_t n) {
    const std::vector<std::string> all = cublaslt_candidates();
    return std::vector<std::string>(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(std::min(n, all.size())));
  };
  {
    ScopedEnv home("CUDA_HOME", "/opt/cuda");
    EXPECT_EQ(first(3), (std::vector<std::string>{so, "/opt/cuda/lib64/" + so, "/usr/local/cuda/lib64/" + so}));
  }
  ScopedEnv home("CUDA_HOME", nullptr);
  EXPECT_EQ(first(2), (std::vector<std::string>{so, "/usr/local/cuda/lib64/" + so}));
  for (const std::string& pip : first(100)) EXPECT_NE(pip, "/opt/cuda/lib64/" + so);
}

// pip's wheels put libcublasLt off the loader's path: nvidia-cublas (CUDA 13) in site-packages/nvidia/cu13/lib,
// nvidia-cublas-cu12 in site-packages/nvidia/cublas/lib. Both are searched after the system's places, through the
// search that finds TensorRT's wheels (pip_library_dirs).
TEST(CublasLt, FindsPipsWheelsAfterTheSystemPlaces) {
  namespace fs = std::filesystem;
  const std::string so = "libcublasLt.so." + std::to_string(cublaslt_major());
  std::string venv_name = (fs::temp_directory_path() / "adafuse-lt-XXXXXX").string();
  ASSERT_NE(mkdtemp(venv_name.data()), nullptr);
  const fs::path venv = venv_name;
  const std::unique_ptr<const fs::path, void (*)(const fs::path*)> remove_venv(&venv, [](const fs::path* p) {
    std::error_code ec;
    fs::remove_all(*p, ec);
  });
  const fs::path site = venv / "lib" / "python3.12" / "site-packages";
  const fs::path cu_major = site / "nvidia" / ("cu" + std::to_string(cublaslt_major())) / "lib";
  const fs::path cu12 = site / "nvidia" / "cublas" / "lib";
  fs::create_directories(cu_major);
  fs::create_directories(cu12);
  ScopedEnv lib("ADAFUSE_CUBLASLT_LIB", nullptr);
  ScopedEnv home("CUDA_HOME", nullptr);
  ScopedEnv env("VIRTUAL_ENV", venv.c_str());
  const std::vector<std::string> tried = cublaslt_candidates();
  const std::string in_major = fs::canonical(cu_major).string() + "/" + so, in_cu12 = fs::canonical(cu12).string() + "/" + so;
  ASSERT_GE(tried.size(), 4u);
  EXPECT_EQ(std::vector<std::string>(tried.begin(), tried.begin() + 4),
            (std::vector<std::string>{so, "/usr/local/cuda/lib64/" + so, in_major, in_cu12}));
  if (void* h = dlopen(so.c_str(), RTLD_LAZY)) {
    dlclose(h);
    GTEST_SKIP() << so << " is on the loader's path here";
  }
  if (fs::exists("/usr/local/cuda/lib64/" + so)) GTEST_SKIP() << "/usr/local/cuda/lib64/" << so << " exists here";
  // None in either folder: the refusal names both and says what to install.
  try {
    CublasLt::load();
    FAIL() << "loaded a library from empty folders";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(", " + in_major + ", " + in_cu12), std::string::npos) << m;
    EXPECT_NE(m.find("; install pip's nvidia-cublas"), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
  // A library of this major in the CUDA 12 layout (the CUDA 13 folder empty): found and loaded there.
  fs::copy_file(CUBLASLT_STUB, cu12 / so);
  const auto found = CublasLt::load();
  EXPECT_EQ(found->path(), in_cu12);
  EXPECT_EQ(found->version(), size_t(cublaslt_major()) * 10000 + 100);
}

TEST(CublasLt, RefusesAMissingIncompleteOrOtherMajorLibraryInOneLine) {
  const std::string missing = refusal("/nonexistent/libcublasLt.so.13");
  EXPECT_EQ(missing.rfind("cuBLASLt: cannot load /nonexistent/libcublasLt.so.13: ", 0), 0u) << missing;
  EXPECT_EQ(refusal(CUBLASLT_STUB_INCOMPLETE),
            std::string("cuBLASLt: ") + CUBLASLT_STUB_INCOMPLETE + " is not a cuBLASLt library (no cublasLtMatmulAlgoGetHeuristic)");
  EXPECT_EQ(refusal(NVINFER_101401).find(" is not a cuBLASLt library (no cublasLtGetVersion, cublasLtGetStatusString, "
                                         "cublasLtCreate,"),
            std::string("cuBLASLt: ").size() + std::string(NVINFER_101401).size());
  const int major = cublaslt_major();
  EXPECT_EQ(refusal(CUBLASLT_STUB_OTHER_MAJOR),
            std::string("cuBLASLt: ") + CUBLASLT_STUB_OTHER_MAJOR + " is version " + std::to_string(major - 1) +
                ".9.5; this runtime is built for CUDA " + std::to_string(major) + " and needs cuBLASLt " +
                std::to_string(major) + ".x (libcublasLt.so." + std::to_string(major) + ")");
  for (const std::string& m : {missing, refusal(CUBLASLT_STUB_OTHER_MAJOR)}) EXPECT_EQ(m.find('\n'), std::string::npos);
}

TEST(CublasLt, LoadsEveryEntryPointOfItsMajorAndNamesStatuses) {
  const auto lib = CublasLt::load_from(CUBLASLT_STUB);
  EXPECT_EQ(lib->version(), size_t(cublaslt_major()) * 10000 + 100);
  EXPECT_EQ(lib->path(), CUBLASLT_STUB);
  EXPECT_EQ(lib->status_text(1), "stub: not initialized (1)");
  // A handle the library will not create: refused at construction, naming the call and the status.
  static char workspace[16];
  try {
    LtGemms gemms(lib, workspace, sizeof workspace);
    FAIL() << "a handle the library refused";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), ADAFUSE_ERR_CUDA);
    EXPECT_STREQ(e.what(), "cuBLASLt: cublasLtCreate: stub: not initialized (1)");
  }
}

TEST(CublasLt, TheOverrideIsTheOnlyPlaceTriedAndNamed) {
  ScopedEnv lib("ADAFUSE_CUBLASLT_LIB", "/nonexistent/libcublasLt.so");
  try {
    CublasLt::load();
    FAIL() << "loaded a library that does not exist";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.rfind("cuBLASLt: cannot load /nonexistent/libcublasLt.so: ", 0), 0u) << m;
    EXPECT_NE(m.find("(ADAFUSE_CUBLASLT_LIB)"), std::string::npos) << m;
  }
  ScopedEnv stub("ADAFUSE_CUBLASLT_LIB", CUBLASLT_STUB_OTHER_MAJOR);
  try {
    CublasLt::load();
    FAIL() << "loaded a library of another major";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(" is version "), std::string::npos) << e.what();
  }
}

TEST(CublasLt, NativeGemmChoice) {
  {
    ScopedEnv v("ADAFUSE_NATIVE_GEMM", nullptr);
    EXPECT_EQ(native_gemm_choice(), GemmChoice::automatic);
  }
  const std::pair<const char*, GemmChoice> values[] = {
      {"auto", GemmChoice::automatic}, {"cublaslt", GemmChoice::cublaslt}, {"kernels", GemmChoice::kernels}};
  for (const auto& [text, choice] : values) {
    ScopedEnv v("ADAFUSE_NATIVE_GEMM", text);
    EXPECT_EQ(native_gemm_choice(), choice) << text;
  }
  ScopedEnv v("ADAFUSE_NATIVE_GEMM", "cublas");
  try {
    native_gemm_choice();
    FAIL() << "an unknown choice";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), ADAFUSE_ERR_INVALID_ARGUMENT);
    EXPECT_STREQ(e.what(), "ADAFUSE_NATIVE_GEMM 'cublas' is unknown (expected auto, cublaslt or kernels)");
  }
}

// LtGemms over a stand-in whose calls succeed without work (cublaslt_stub.cpp STUB_WORKING): the heuristic runs once
// per (shape, rows, alignment) and is kept; no algorithm is said once and leaves the GEMM to the caller; a failed
// cublasLtMatmul is an error naming the call and the status.
struct StubCalls {
  int heuristic = 0, matmul = 0;
};
StubCalls stub_calls() {
  void* handle = dlopen(CUBLASLT_STUB_WORKING, RTLD_NOW | RTLD_NOLOAD);
  EXPECT_NE(handle, nullptr);
  using Fn = void (*)(int*, int*);
  StubCalls c;
  reinterpret_cast<Fn>(dlsym(handle, "cublaslt_stub_calls"))(&c.heuristic, &c.matmul);
  dlclose(handle);
  return c;
}

void* at(uintptr_t address) { return reinterpret_cast<void*>(address); }

TEST(CublasLt, GemmPlansAreChosenOnceAndAFailedCallIsNamed) {
  const auto lib = CublasLt::load_from(CUBLASLT_STUB_WORKING);
  LtGemms gemms(lib, at(0x10000), 4096);
  const StubCalls start = stub_calls();
  LtGemm g;
  g.m = 96;
  g.n = 17;
  g.k = 64;
  g.X = at(0x20000);
  g.W = at(0x30000);
  g.D = at(0x40000);
  auto since = [&] {
    const StubCalls now = stub_calls();
    return std::make_pair(now.heuristic - start.heuristic, now.matmul - start.matmul);
  };
  EXPECT_TRUE(gemms.run(g, nullptr, "site (17 rows)"));
  EXPECT_TRUE(gemms.run(g, nullptr, "site (17 rows)"));
  EXPECT_EQ(since(), std::make_pair(1, 2));  // one plan, two GEMMs
  g.n = 32;  // another row count
  EXPECT_TRUE(gemms.run(g, nullptr, "site (32 rows)"));
  g.D = at(0x40002);  // the same shape, D only 2-byte aligned: an algorithm chosen for 256 bytes may refuse it
  EXPECT_TRUE(gemms.run(g, nullptr, "site (32 rows)"));
  g.bias = at(0x50000);  // the bias epilogue is another plan
  EXPECT_TRUE(gemms.run(g, nullptr, "site (32 rows)"));
  EXPECT_EQ(since(), std::make_pair(4, 5));
  {
    ScopedEnv none("CUBLASLT_STUB_ALGOS", "0");
    g.n = 64;
    testing::internal::CaptureStderr();
    EXPECT_FALSE(gemms.run(g, nullptr, "site (64 rows)"));
    EXPECT_FALSE(gemms.run(g, nullptr, "site (64 rows)"));
    EXPECT_EQ(testing::internal::GetCapturedStderr(),
              "[adafuse] site (64 rows): cuBLASLt offers no algorithm (none returned); the kernel library's GEMM runs it\n");
    EXPECT_EQ(since(), std::make_pair(5, 5));  // asked once, never run
  }
  ScopedEnv failing("CUBLASLT_STUB_MATMUL_STATUS", "13");
  g.n = 17;
  g.bias = nullptr;
  g.D = at(0x40000);
  try {
    gemms.run(g, nullptr, "cuBLASLt at layers.3.qkv (17 rows)");
    FAIL() << "a failed cublasLtMatmul was not reported";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), ADAFUSE_ERR_CUDA);
    EXPECT_STREQ(e.what(), "cuBLASLt at layers.3.qkv (17 rows): cublasLtMatmul: stub: execution failed (13)");
  }
  // a projection without adapter is that one GEMM
  ScopedEnv working("CUBLASLT_STUB_MATMUL_STATUS", "0");
  LtLoraCall c;
  c.rows = 17;
  c.in = 64;
  c.out = 96;
  c.x = g.X;
  c.W = g.W;
  c.y = g.D;
  const StubCalls before = stub_calls();
  EXPECT_TRUE(lt_lora_linear(gemms, c, nullptr, "dense site"));
  EXPECT_EQ(stub_calls().matmul, before.matmul + 1);
  EXPECT_EQ(stub_calls().heuristic, before.heuristic);  // the plan of (96, 17, 64) made above
  c.dtype = 0;  // float32 never reaches cuBLASLt
  EXPECT_THROW(lt_lora_linear(gemms, c, nullptr, "float32 site"), Error);
}

TEST(CublasLt, TheNativeBackendsChoiceByDtypeAndSetting) {
  ScopedEnv lib("ADAFUSE_CUBLASLT_LIB", "/nonexistent/libcublasLt.so");
  std::string missing;
  {
    ScopedEnv v("ADAFUSE_NATIVE_GEMM", "cublaslt");
    EXPECT_EQ(native_cublaslt("float32", &missing), nullptr);  // float32 never runs cuBLASLt, so never needs it
    EXPECT_EQ(missing, "");
    try {
      native_cublaslt("bfloat16", &missing);
      FAIL() << "cuBLASLt required and absent";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), ADAFUSE_ERR_CUDA);
      const std::string m = e.what();
      EXPECT_EQ(m.rfind("cuBLASLt: cannot load /nonexistent/libcublasLt.so: ", 0), 0u) << m;
      const std::string tail = " (ADAFUSE_CUBLASLT_LIB) (ADAFUSE_NATIVE_GEMM=cublaslt requires it)";
      EXPECT_EQ(m.substr(m.size() - tail.size()), tail) << m;
    }
  }
  {
    ScopedEnv v("ADAFUSE_NATIVE_GEMM", "kernels");
    EXPECT_EQ(native_cublaslt("bfloat16", &missing), nullptr);
    EXPECT_EQ(missing, "");
  }
  ScopedEnv v("ADAFUSE_NATIVE_GEMM", nullptr);  // auto: absent is a note, not a refusal
  EXPECT_EQ(native_cublaslt("float16", &missing), nullptr);
  EXPECT_EQ(missing.rfind("cuBLASLt: cannot load /nonexistent/libcublasLt.so: ", 0), 0u) << missing;
  ScopedEnv stub("ADAFUSE_CUBLASLT_LIB", CUBLASLT_STUB);
  const auto found = native_cublaslt("bfloat16", nullptr);
  ASSERT_NE(found, nullptr);
  EXPECT_EQ(found->path(), CUBLASLT_STUB);
}

}  // namespace
}  // namespace adafuse
