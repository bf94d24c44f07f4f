// adafuseLoraLinearPlugin.h - TensorRT IPluginV3 "AdafuseLoraLinear" (version "1",
// namespace ""): the routed fused LoRA linear
//   y = W x (+ bias) + scale * sum_k gates[k] * B[e_k] (A[e_k] x)
// computed by adafuse_lora_linear (plugins/kernels). See README.md for fields and tensors.
// Fields, tensor rules and the creator's parsing are shared with AdafuseSwitchLinear
// (../common/adafuseLinearPluginBase.h); this file holds what is its own.
#ifndef ADAFUSE_LORA_LINEAR_PLUGIN_H
#define ADAFUSE_LORA_LINEAR_PLUGIN_H

#include "adafuseLinearPluginBase.h"

namespace adafuse
{
namespace plugin
{

constexpr char const* kLORA_LINEAR_PLUGIN_NAME = "AdafuseLoraLinear";
constexpr char const* kLORA_LINEAR_PLUGIN_VERSION = "1";
constexpr char const* kLORA_LINEAR_PLUGIN_NAMESPACE = "";

class AdafuseLoraLinearPlugin : public LinearPluginBase
{
public:
    explicit AdafuseLoraLinearPlugin(LinearConfig const& config);
    ~AdafuseLoraLinearPlugin() override = default;

    nvinfer1::IPluginV3* clone() noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
};

class AdafuseLoraLinearPluginCreator : public LinearPluginCreator
{
public:
    AdafuseLoraLinearPluginCreator();
    ~AdafuseLoraLinearPluginCreator() override = default;

protected:
    nvinfer1::IPluginV3* create(LinearConfig const& config) const override;
};

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_LORA_LINEAR_PLUGIN_H
