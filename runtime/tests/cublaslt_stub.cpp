// Test stand-in for libcublasLt: every entry point the runtime resolves (cublaslt.cpp), none doing any GPU work.
// STUB_VERSION follows cublasLtGetVersion(): major * 10000 + minor * 100 + patch.
// Default: every call fails with CUBLAS_STATUS_NOT_INITIALIZED (1), so a caller past the version check is told so.
// STUB_WORKING: handles, descriptors, layouts and preferences are made; the heuristic returns
// $CUBLASLT_STUB_ALGOS algorithms (default 1) and cublasLtMatmul returns $CUBLASLT_STUB_MATMUL_STATUS (default 0);
// cublaslt_stub_calls() counts heuristic and matmul calls for the test (runtime/tests/test_cublaslt.cpp).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define STUB(name) extern "C" int name(...) { return 1; }

extern "C" size_t cublasLtGetVersion() { return STUB_VERSION; }
extern "C" const char* cublasLtGetStatusString(int status) {
  return status == 1 ? "stub: not initialized" : status == 13 ? "stub: execution failed" : "stub: other";
}
#ifdef STUB_WORKING
namespace {
int heuristic_calls = 0, matmul_calls = 0;
char object;  // what every made handle, descriptor, layout and preference points at
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}
}  // namespace
extern "C" void cublaslt_stub_calls(int* heuristic, int* matmul) {
  *heuristic = heuristic_calls;
  *matmul = matmul_calls;
}
extern "C" int cublasLtCreate(void** out) { *out = &object; return 0; }
extern "C" int cublasLtMatmulDescCreate(void** out, ...) { *out = &object; return 0; }
extern "C" int cublasLtMatrixLayoutCreate(void** out, ...) { *out = &object; return 0; }
extern "C" int cublasLtMatmulPreferenceCreate(void** out) { *out = &object; return 0; }
extern "C" int cublasLtDestroy(void*) { return 0; }
extern "C" int cublasLtMatmulDescDestroy(void*) { return 0; }
extern "C" int cublasLtMatrixLayoutDestroy(void*) { return 0; }
extern "C" int cublasLtMatmulPreferenceDestroy(void*) { return 0; }
extern "C" int cublasLtMatmulDescSetAttribute(...) { return 0; }
extern "C" int cublasLtMatmulPreferenceSetAttribute(...) { return 0; }
struct Result {  // cublasLtMatmulHeuristicResult_t
  uint64_t algo[8];
  size_t workspaceSize;
  int state;
  float wavesCount;
  int reserved[4];
};
extern "C" int cublasLtMatmulAlgoGetHeuristic(void*, void*, void*, void*, void*, void*, void*, int, Result* results,
                                              int* count) {
  ++heuristic_calls;
  *count = env_int("CUBLASLT_STUB_ALGOS", 1);
  std::memset(results, 0, sizeof *results);
  return 0;
}
extern "C" int cublasLtMatmul(...) {
  ++matmul_calls;
  return env_int("CUBLASLT_STUB_MATMUL_STATUS", 0);
}
#else
STUB(cublasLtCreate)
STUB(cublasLtDestroy)
STUB(cublasLtMatmul)
STUB(cublasLtMatmulDescCreate)
STUB(cublasLtMatmulDescDestroy)
STUB(cublasLtMatmulDescSetAttribute)
STUB(cublasLtMatrixLayoutCreate)
STUB(cublasLtMatrixLayoutDestroy)
STUB(cublasLtMatmulPreferenceCreate)
STUB(cublasLtMatmulPreferenceDestroy)
STUB(cublasLtMatmulPreferenceSetAttribute)
#ifndef STUB_MISSING_HEURISTIC
STUB(cublasLtMatmulAlgoGetHeuristic)
#endif
#endif
