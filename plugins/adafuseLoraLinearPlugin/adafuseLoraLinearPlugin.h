// adafuseLoraLinearPlugin.h - TensorRT IPluginV3 "AdafuseLoraLinear" (version "1",
// namespace ""): the routed fused LoRA linear
//   y = W x (+ bias) + scale * sum_k gates[k] * B[e_k] (A[e_k] x)
// computed by adafuse_lora_linear (plugins/kernels). See README.md for fields and tensors.
// Fields, tensor rules and the creator's parsing are shared with AdafuseSwitchLinear
// (../common/adafuseLinearPluginBase.h); this file holds what is its own.
//
// One-row workspace. Under programmatic dependent launch (sm_90) the one-row shrink clears a
// flag in its workspace before the previous kernel on the stream has completed. TensorRT's scratch
// workspace is memory TensorRT also hands to other layers, assuming stream order, so a previous
// layer's kernel may still be reading it then: that shrink must not launch early into it. Each
// instance attached to an execution context therefore owns a one-row workspace (allocated in
// attached(), outside any capture, on the context's device) and passes it as exclusive: the
// decode path keeps the overlap of the shrink with the previous kernel's tail. Enqueues of more
// rows, and of build-time instances (TensorRT's timing runs, never attached), use TensorRT's
// scratch as non-exclusive: the shrink then runs in stream order (adafuse_lora_options).
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
    ~AdafuseLoraLinearPlugin() override;

    nvinfer1::IPluginV3* clone() noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    void attached() override;

private:
    // Device state, owned by this instance only (never shared by clones).
    int mDevice{-1};               // device of mOneRowWorkspace, -1 = none
    void* mOneRowWorkspace{nullptr}; // adafuse_lora_linear_workspace_size(1, ...) bytes
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
