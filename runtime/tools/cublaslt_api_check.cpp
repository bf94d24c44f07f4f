// Compile-time check of the hand-kept cuBLASLt declarations (src/cublaslt_api.h) against the real cublasLt.h:
// built only where CMake finds that header (runtime/CMakeLists.txt). Nothing here runs; a wrong enum value,
// struct layout or function type is a compile error.
#include <cublasLt.h>

#include <cstddef>
#include <type_traits>

#include "cublaslt_api.h"

namespace lt = adafuse::lt;

// Enum values (compared as ints: the C enums' underlying type is the compiler's choice).
template <typename E>
constexpr int value(E e) { return static_cast<int>(e); }
static_assert(lt::kStatusSuccess == value(CUBLAS_STATUS_SUCCESS));
static_assert(lt::kStatusExecutionFailed == value(CUBLAS_STATUS_EXECUTION_FAILED));
static_assert(lt::kCompute32F == value(CUBLAS_COMPUTE_32F));
static_assert(lt::kOpN == value(CUBLAS_OP_N));
static_assert(lt::kOpT == value(CUBLAS_OP_T));
static_assert(lt::kEpilogueDefault == value(CUBLASLT_EPILOGUE_DEFAULT));
static_assert(lt::kEpilogueBias == value(CUBLASLT_EPILOGUE_BIAS));
static_assert(lt::kDescTransA == value(CUBLASLT_MATMUL_DESC_TRANSA));
static_assert(lt::kDescTransB == value(CUBLASLT_MATMUL_DESC_TRANSB));
static_assert(lt::kDescEpilogue == value(CUBLASLT_MATMUL_DESC_EPILOGUE));
static_assert(lt::kDescBiasPointer == value(CUBLASLT_MATMUL_DESC_BIAS_POINTER));
static_assert(lt::kPrefMaxWorkspaceBytes == value(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES));
static_assert(lt::kPrefMinAlignmentA == value(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES));
static_assert(lt::kPrefMinAlignmentB == value(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES));
static_assert(lt::kPrefMinAlignmentC == value(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES));
static_assert(lt::kPrefMinAlignmentD == value(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES));

// The enums travel as 32-bit ints.
template <typename Ours, typename Theirs>
constexpr bool same_abi = sizeof(Ours) == sizeof(Theirs) && alignof(Ours) == alignof(Theirs);
static_assert(same_abi<lt::Status, cublasStatus_t>);
static_assert(same_abi<lt::ComputeType, cublasComputeType_t>);
static_assert(same_abi<lt::Operation, cublasOperation_t>);
static_assert(same_abi<lt::Epilogue, cublasLtEpilogue_t>);
static_assert(same_abi<lt::DescAttribute, cublasLtMatmulDescAttributes_t>);
static_assert(same_abi<lt::PrefAttribute, cublasLtMatmulPreferenceAttributes_t>);
static_assert(same_abi<lt::Handle, cublasLtHandle_t>);
static_assert(same_abi<lt::MatmulDesc, cublasLtMatmulDesc_t>);
static_assert(same_abi<lt::MatrixLayout, cublasLtMatrixLayout_t>);
static_assert(same_abi<lt::Preference, cublasLtMatmulPreference_t>);

// The structs, field by field.
static_assert(same_abi<lt::MatmulAlgo, cublasLtMatmulAlgo_t>);
static_assert(same_abi<lt::HeuristicResult, cublasLtMatmulHeuristicResult_t>);
static_assert(offsetof(lt::HeuristicResult, algo) == offsetof(cublasLtMatmulHeuristicResult_t, algo));
static_assert(offsetof(lt::HeuristicResult, workspaceSize) == offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize));
static_assert(offsetof(lt::HeuristicResult, state) == offsetof(cublasLtMatmulHeuristicResult_t, state));
static_assert(offsetof(lt::HeuristicResult, wavesCount) == offsetof(cublasLtMatmulHeuristicResult_t, wavesCount));
static_assert(offsetof(lt::HeuristicResult, reserved) == offsetof(cublasLtMatmulHeuristicResult_t, reserved));

// The function types: the template of cublaslt_api.h over the real types is exactly each declaration's type, so
// over ours (same sizes, checked above) it is the same call.
using Real = lt::Functions<cublasStatus_t, cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                           cublasLtMatmulPreference_t, cublasComputeType_t, cudaDataType_t, cublasLtMatmulDescAttributes_t,
                           cublasLtMatmulPreferenceAttributes_t, cublasLtMatmulAlgo_t, cublasLtMatmulHeuristicResult_t>;
static_assert(std::is_same_v<decltype(&cublasLtGetVersion), Real::GetVersion>);
static_assert(std::is_same_v<decltype(&cublasLtGetStatusString), Real::GetStatusString>);
static_assert(std::is_same_v<decltype(&cublasLtCreate), Real::Create>);
static_assert(std::is_same_v<decltype(&cublasLtDestroy), Real::Destroy>);
static_assert(std::is_same_v<decltype(&cublasLtMatmul), Real::Matmul>);
static_assert(std::is_same_v<decltype(&cublasLtMatmulDescCreate), Real::MatmulDescCreate>);
static_assert(std::is_same_v<decltype(&cublasLtMatmulDescDestroy), Real::MatmulDescDestroy>);
static_assert(std::is_same_v<decltype(&cublasLtMatmulDescSetAttribute), Real::MatmulDescSetAttribute>);
static_assert(std::is_same_v<decltype(&cublasLtMatrixLayoutCreate), Real::MatrixLayoutCreate>);
static_assert(std::is_same_v<decltype(&cublasLtMatrixLayoutDestroy), Real::MatrixLayoutDestroy>);
static_assert(std::is_same_v<decltype(&cublasLtMatmulPreferenceCreate), Real::PreferenceCreate>);
static_assert(std::is_same_v<decltype(&cublasLtMatmulPreferenceDestroy), Real::PreferenceDestroy>);
static_assert(std::is_same_v<decltype(&cublasLtMatmulPreferenceSetAttribute), Real::PreferenceSetAttribute>);
static_assert(std::is_same_v<decltype(&cublasLtMatmulAlgoGetHeuristic), Real::AlgoGetHeuristic>);
