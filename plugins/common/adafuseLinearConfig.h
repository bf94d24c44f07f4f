// adafuseLinearConfig.h - fields, tensor positions and shape/type rules shared by
// the AdafuseLoraLinear and AdafuseSwitchLinear plugins (same inputs, same fields).
#ifndef ADAFUSE_LINEAR_CONFIG_H
#define ADAFUSE_LINEAR_CONFIG_H

#include "adafusePluginCommon.h"

#include <array>

namespace adafuse
{
namespace plugin
{

// Input positions (named constants; bias exists only when has_bias = 1, weight_scale only when
// weight_dtype = 1, at LinearConfig::weightScaleIndex(): after the bias).
constexpr int32_t kINPUT_X = 0;          // [..., in_features]            f32 / f16 / bf16
constexpr int32_t kINPUT_W = 1;          // [out_features, in_features]   dtype of x, or fp8 e4m3 (weight_dtype 1)
constexpr int32_t kINPUT_A = 2;          // [num_experts, rank, in]       dtype of x
constexpr int32_t kINPUT_B = 3;          // [num_experts, out, rank]      dtype of x
constexpr int32_t kINPUT_EXPERT_IDS = 4; // [..., top_k]                  int32
constexpr int32_t kINPUT_GATES = 5;      // [..., top_k]                  float32
constexpr int32_t kINPUT_BIAS = 6;       // [out_features]                dtype of x
                                         // weight_scale [out_features]   float32 (weight_dtype 1 only)
constexpr int32_t kOUTPUT_Y = 0;         // [..., out_features]           dtype of x
constexpr int32_t kNB_OUTPUTS = 1;

// Field names, in serialization order (identical to the ONNX node attributes).
constexpr char const* kFIELD_IN_FEATURES = "in_features";
constexpr char const* kFIELD_OUT_FEATURES = "out_features";
constexpr char const* kFIELD_NUM_EXPERTS = "num_experts";
constexpr char const* kFIELD_RANK = "rank";
constexpr char const* kFIELD_TOP_K = "top_k";
constexpr char const* kFIELD_SCALE = "scale";
constexpr char const* kFIELD_HAS_BIAS = "has_bias";
// adafuse_weight_dtype of W: 0 the dtype of x, 1 float8 e4m3 with per-output-channel float32 scales (the
// weight_scale input; x float16 or bfloat16, in_features % 16 == 0: the kernels' FP8 path). Added after the
// first seven fields: a collection without it (an engine serialized before it) reads as 0, so those engines
// keep their meaning; a plugin library of before warns it away as unknown and then refuses the FP8 W at
// configurePlugin / onShapeChange (its type is not x's) instead of reading bytes as 16-bit weights.
constexpr char const* kFIELD_WEIGHT_DTYPE = "weight_dtype";
constexpr int32_t kNB_FIELDS = 8;

//! Rows per adafuse_lora_linear call: larger inputs (long prefills) are processed in chunks
//! of this many rows, and the workspace is sized for one chunk. 2048 rows keep the tensor
//! cores busy while the fp32 LoRA accumulator (rows x out_features x 4 bytes) stays small.
constexpr int32_t kLORA_CHUNK_ROWS = 2048;
static_assert(kLORA_CHUNK_ROWS <= ADAFUSE_LORA_MAX_ROWS, "a chunk must fit one adafuse_lora_linear call");

struct LinearFields
{
    int32_t inFeatures{0};
    int32_t outFeatures{0};
    int32_t numExperts{0};
    int32_t rank{0};
    int32_t topK{0};
    float scale{1.0F};
    int32_t hasBias{0};
    int32_t weightDtype{ADAFUSE_WEIGHT_AS_DTYPE};
};

//! Validated fields plus the shape and type rules of the routed linear.
class LinearConfig
{
public:
    //! Throws PluginError naming the plugin, the field, the expected and the found value.
    LinearConfig(char const* pluginName, LinearFields const& fields);
    LinearConfig(LinearConfig const& other);
    LinearConfig& operator=(LinearConfig const& other);

    //! Parses and validates a field collection (createPlugin). Unknown fields are warned about.
    static LinearConfig fromFieldCollection(char const* pluginName, nvinfer1::PluginFieldCollection const* fc);
    //! Field names and types for IPluginCreatorV3One::getFieldNames (data = nullptr).
    static nvinfer1::PluginFieldCollection const* fieldNames();

    LinearFields const& fields() const noexcept { return mFields; }
    char const* pluginName() const noexcept { return mPlugin; }
    int32_t nbInputs() const noexcept { return 6 + mFields.hasBias + (fp8Weights() ? 1 : 0); }
    //! W is float8 e4m3 with a float32 weight_scale input (weight_dtype 1).
    bool fp8Weights() const noexcept { return mFields.weightDtype == ADAFUSE_WEIGHT_FP8_E4M3; }
    //! Position of the weight_scale input (fp8Weights() only): after the bias when there is one.
    int32_t weightScaleIndex() const noexcept { return kINPUT_BIAS + mFields.hasBias; }

    //! Collection pointing into this object (valid while it lives and is not modified).
    nvinfer1::PluginFieldCollection const* fieldsToSerialize();

    // --- build-time rules ---
    void outputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
        int32_t nbInputs) const;
    void outputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) const;
    bool supportsFormatCombination(
        int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) const;
    //! configurePlugin: counts, types and the static dimensions (-1 = dynamic is skipped).
    //! The profile's min/max are bounds that TensorRT derives per tensor (a Reshape may give
    //! expert_ids a looser bound than x), so they are not compared with each other.
    void checkTensors(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) const;
    //! onShapeChange: counts, types and every dimension (all known there).
    void checkTensors(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) const;
    //! Product of the leading dimensions of x (throws on -1 or overflow of int32).
    int32_t rows(nvinfer1::Dims const& xDims) const;
    //! Upper bound of the rows of x from the profile's max dims (saturates at INT64_MAX/2).
    static int64_t maxRows(nvinfer1::Dims const& xMaxDims);
    //! Workspace for adafuse_lora_linear over one chunk: min(profile max rows, kLORA_CHUNK_ROWS).
    size_t loraWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs) const;

    //! top_k, num_experts and rank within adafuse_kernels.h's limits (throws naming value and limit).
    void checkKernelLimits() const;

private:
    void validate() const;
    char const* mPlugin;
    LinearFields mFields;
    std::array<nvinfer1::PluginField, kNB_FIELDS> mSerial{};
    nvinfer1::PluginFieldCollection mSerialFc{};
};

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_LINEAR_CONFIG_H
