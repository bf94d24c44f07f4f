// The subset of cuBLASLt's C API the native backend calls, declared by hand: the runtime opens
// libcublasLt at run time (cublaslt.h) and builds where no cuBLAS header exists (CI, the CPU machines).
// Taken from cublasLt.h / cublas_api.h of CUDA 13.0 (unchanged since CUDA 11.x for everything here).
// runtime/tools/cublaslt_api_check.cpp static_asserts every value and function type below against the
// real header wherever CMake finds one (runtime/CMakeLists.txt: target adafuse_cublaslt_api_check).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>
#include <library_types.h>  // cudaDataType_t (CUDA_R_16F, CUDA_R_16BF, CUDA_R_32F): part of the CUDA runtime's headers

namespace adafuse::lt {

// Opaque handles (cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t, cublasLtMatmulPreference_t).
struct Context;
struct MatmulDescOpaque;
struct MatrixLayoutOpaque;
struct PreferenceOpaque;
using Handle = Context*;
using MatmulDesc = MatmulDescOpaque*;
using MatrixLayout = MatrixLayoutOpaque*;
using Preference = PreferenceOpaque*;

// C enums of the header, each passed and returned as a 32-bit int.
using Status = int32_t;          // cublasStatus_t
using ComputeType = int32_t;     // cublasComputeType_t
using Operation = int32_t;       // cublasOperation_t
using Epilogue = int32_t;        // cublasLtEpilogue_t
using DescAttribute = int32_t;   // cublasLtMatmulDescAttributes_t
using PrefAttribute = int32_t;   // cublasLtMatmulPreferenceAttributes_t

inline constexpr Status kStatusSuccess = 0;            // CUBLAS_STATUS_SUCCESS
inline constexpr Status kStatusExecutionFailed = 13;   // CUBLAS_STATUS_EXECUTION_FAILED
inline constexpr ComputeType kCompute32F = 68;         // CUBLAS_COMPUTE_32F
inline constexpr Operation kOpN = 0;                   // CUBLAS_OP_N
inline constexpr Operation kOpT = 1;                   // CUBLAS_OP_T
inline constexpr Epilogue kEpilogueDefault = 1;        // CUBLASLT_EPILOGUE_DEFAULT
inline constexpr Epilogue kEpilogueBias = 4;           // CUBLASLT_EPILOGUE_BIAS
inline constexpr DescAttribute kDescTransA = 3;        // CUBLASLT_MATMUL_DESC_TRANSA (int32_t)
inline constexpr DescAttribute kDescTransB = 4;        // CUBLASLT_MATMUL_DESC_TRANSB (int32_t)
inline constexpr DescAttribute kDescEpilogue = 7;      // CUBLASLT_MATMUL_DESC_EPILOGUE (uint32_t)
inline constexpr DescAttribute kDescBiasPointer = 8;   // CUBLASLT_MATMUL_DESC_BIAS_POINTER (const void*)
inline constexpr PrefAttribute kPrefMaxWorkspaceBytes = 1;  // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES (uint64_t)
inline constexpr PrefAttribute kPrefMinAlignmentA = 5;      // CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES (uint32_t)
inline constexpr PrefAttribute kPrefMinAlignmentB = 6;      // ..._B_BYTES
inline constexpr PrefAttribute kPrefMinAlignmentC = 7;      // ..._C_BYTES
inline constexpr PrefAttribute kPrefMinAlignmentD = 8;      // ..._D_BYTES

struct MatmulAlgo {  // cublasLtMatmulAlgo_t
  uint64_t data[8];
};
struct HeuristicResult {  // cublasLtMatmulHeuristicResult_t
  MatmulAlgo algo;
  size_t workspaceSize;
  Status state;
  float wavesCount;
  int reserved[4];
};

// The functions' types, written once over the types they take: Functions<ours...> is what the runtime
// calls through, Functions<the real header's...> what the check TU compares with decltype(&cublasLt...).
template <typename Status_, typename Handle_, typename Desc_, typename Layout_, typename Pref_, typename Compute_,
          typename DataType_, typename DescAttr_, typename PrefAttr_, typename Algo_, typename Heuristic_>
struct Functions {
  using GetVersion = size_t (*)();
  using GetStatusString = const char* (*)(Status_);
  using Create = Status_ (*)(Handle_*);
  using Destroy = Status_ (*)(Handle_);
  using Matmul = Status_ (*)(Handle_, Desc_, const void*, const void*, Layout_, const void*, Layout_, const void*,
                             const void*, Layout_, void*, Layout_, const Algo_*, void*, size_t, cudaStream_t);
  using MatmulDescCreate = Status_ (*)(Desc_*, Compute_, DataType_);
  using MatmulDescDestroy = Status_ (*)(Desc_);
  using MatmulDescSetAttribute = Status_ (*)(Desc_, DescAttr_, const void*, size_t);
  using MatrixLayoutCreate = Status_ (*)(Layout_*, DataType_, uint64_t, uint64_t, int64_t);
  using MatrixLayoutDestroy = Status_ (*)(Layout_);
  using PreferenceCreate = Status_ (*)(Pref_*);
  using PreferenceDestroy = Status_ (*)(Pref_);
  using PreferenceSetAttribute = Status_ (*)(Pref_, PrefAttr_, const void*, size_t);
  using AlgoGetHeuristic = Status_ (*)(Handle_, Desc_, Layout_, Layout_, Layout_, Layout_, Pref_, int, Heuristic_*, int*);
};

using Api = Functions<Status, Handle, MatmulDesc, MatrixLayout, Preference, ComputeType, cudaDataType_t, DescAttribute,
                      PrefAttribute, MatmulAlgo, HeuristicResult>;

// The resolved entry points (cublaslt.cpp fills every one or refuses the library).
struct Entry {
  Api::GetVersion get_version = nullptr;                   // cublasLtGetVersion
  Api::GetStatusString get_status_string = nullptr;        // cublasLtGetStatusString
  Api::Create create = nullptr;                            // cublasLtCreate
  Api::Destroy destroy = nullptr;                          // cublasLtDestroy
  Api::Matmul matmul = nullptr;                            // cublasLtMatmul
  Api::MatmulDescCreate desc_create = nullptr;             // cublasLtMatmulDescCreate
  Api::MatmulDescDestroy desc_destroy = nullptr;           // cublasLtMatmulDescDestroy
  Api::MatmulDescSetAttribute desc_set = nullptr;          // cublasLtMatmulDescSetAttribute
  Api::MatrixLayoutCreate layout_create = nullptr;         // cublasLtMatrixLayoutCreate
  Api::MatrixLayoutDestroy layout_destroy = nullptr;       // cublasLtMatrixLayoutDestroy
  Api::PreferenceCreate pref_create = nullptr;             // cublasLtMatmulPreferenceCreate
  Api::PreferenceDestroy pref_destroy = nullptr;           // cublasLtMatmulPreferenceDestroy
  Api::PreferenceSetAttribute pref_set = nullptr;          // cublasLtMatmulPreferenceSetAttribute
  Api::AlgoGetHeuristic get_heuristic = nullptr;           // cublasLtMatmulAlgoGetHeuristic
};

}  // namespace adafuse::lt
