// adafuseSwitchLinearPlugin.h - TensorRT IPluginV3 "AdafuseSwitchLinear" (version "1",
// namespace ""): the merged ("switch") strategy for batch-1 decode.
//
// TensorRT hands weights to a plugin as read-only inputs, so the plugin never writes
// W. Each plugin instance (one per execution context: attachToContext clones) owns
//   - a device copy W_merged [out, in] = W + scale * sum_k g_k B[e_k] A[e_k] for the
//     route merged last,
//   - that route (ids, gates) in device memory, and a one-entry adafuse_switch site table.
// enqueue with one row: adafuse_switch re-derives W_merged from the pristine input W
// (W_base mode) when the route differs from the merged one (compared on the device;
// nothing is written when it is unchanged), then a plain GEMV y = W_merged x (+ bias).
// enqueue with more rows (prefill; rows may have different routes): the unmerged
// routed path adafuse_lora_linear on the input W; W_merged is left as it was.
// See README.md.
#ifndef ADAFUSE_SWITCH_LINEAR_PLUGIN_H
#define ADAFUSE_SWITCH_LINEAR_PLUGIN_H

#include "adafuseLinearConfig.h"

namespace adafuse
{
namespace plugin
{

constexpr char const* kSWITCH_LINEAR_PLUGIN_NAME = "AdafuseSwitchLinear";
constexpr char const* kSWITCH_LINEAR_PLUGIN_VERSION = "1";
constexpr char const* kSWITCH_LINEAR_PLUGIN_NAMESPACE = "";

class AdafuseSwitchLinearPlugin : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit AdafuseSwitchLinearPlugin(LinearConfig const& config);
    ~AdafuseSwitchLinearPlugin() override;
    AdafuseSwitchLinearPlugin(AdafuseSwitchLinearPlugin const&) = delete;
    AdafuseSwitchLinearPlugin& operator=(AdafuseSwitchLinearPlugin const&) = delete;

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
    void ensureDeviceState(nvinfer1::DataType type);
    void releaseDeviceState() noexcept;

    LinearConfig mConfig;
    // Device state, owned by this instance only (never shared by clones).
    void* mMerged{nullptr};                    // [out, in] of mMergedType
    nvinfer1::DataType mMergedType{nvinfer1::DataType::kFLOAT};
    adafuse_switch_site* mSiteDev{nullptr};    // one site record
    int32_t* mOldIds{nullptr};                 // [top_k], -1 = nothing merged
    float* mOldGates{nullptr};                 // [top_k]
    // Host-side bookkeeping of what was enqueued into the device state.
    bool mRouteResetEnqueued{false};
    bool mSiteValid{false};
    adafuse_switch_site mSiteHost{};
};

class AdafuseSwitchLinearPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    AdafuseSwitchLinearPluginCreator() = default;
    ~AdafuseSwitchLinearPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_SWITCH_LINEAR_PLUGIN_H
