// adafuseLoraLinearPlugin.h - TensorRT IPluginV3 "AdafuseLoraLinear" (version "1",
// namespace ""): the routed fused LoRA linear
//   y = W x (+ bias) + scale * sum_k gates[k] * B[e_k] (A[e_k] x)
// computed by adafuse_lora_linear (plugins/kernels). See README.md for fields and tensors.
#ifndef ADAFUSE_LORA_LINEAR_PLUGIN_H
#define ADAFUSE_LORA_LINEAR_PLUGIN_H

#include "adafuseLinearConfig.h"

#include <string>

namespace adafuse
{
namespace plugin
{

constexpr char const* kLORA_LINEAR_PLUGIN_NAME = "AdafuseLoraLinear";
constexpr char const* kLORA_LINEAR_PLUGIN_VERSION = "1";
constexpr char const* kLORA_LINEAR_PLUGIN_NAMESPACE = "";

class AdafuseLoraLinearPlugin : public nvinfer1::IPluginV3,
                                public nvinfer1::IPluginV3OneCore,
                                public nvinfer1::IPluginV3OneBuild,
                                public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit AdafuseLoraLinearPlugin(LinearConfig const& config);
    ~AdafuseLoraLinearPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    LinearConfig mConfig;
};

class AdafuseLoraLinearPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    AdafuseLoraLinearPluginCreator() = default;
    ~AdafuseLoraLinearPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_LORA_LINEAR_PLUGIN_H
