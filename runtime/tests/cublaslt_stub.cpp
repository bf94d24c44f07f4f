// Test stand-in for libcublasLt: every entry point the runtime resolves (cublaslt.cpp), none doing any work.
// STUB_VERSION follows cublasLtGetVersion(): major * 10000 + minor * 100 + patch. Creating a handle fails with
// CUBLAS_STATUS_NOT_INITIALIZED (1), so a caller past the version check is told so by the status text.
#include <cstddef>
#include <cstdint>

#define STUB(name) extern "C" int name(...) { return 1; }

extern "C" size_t cublasLtGetVersion() { return STUB_VERSION; }
extern "C" const char* cublasLtGetStatusString(int status) { return status == 1 ? "stub: not initialized" : "stub: other"; }
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
