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
//
// Device state and CUDA-graph capture (TensorRT may call onShapeChange lazily inside
// enqueueV3, under stream capture, where cudaMalloc would invalidate the capture):
//   - attachToContext allocates the route state and the site record on the context's device;
//   - W_merged needs the dtype, which only a tensor description carries: the first one-row
//     enqueue outside capture allocates it (TensorRT's CUDA-graph guide asks for one
//     enqueueV3 outside capture after a shape change anyway); one under capture without it
//     fails with a message saying so, leaving the capture intact (no CUDA call was made);
//   - enqueue works on the stream's device (cudaStreamGetDevice) and refuses a stream of
//     another device than its state;
//   - the site record is rewritten on the device when the weight addresses change (a kernel
//     compares it, and resets the merged route when it differs), so a captured graph stays
//     correct whatever ran between its capture and its replay.
// Fields, tensor rules and the creator's parsing are shared with AdafuseLoraLinear
// (../common/adafuseLinearPluginBase.h). See README.md.
#ifndef ADAFUSE_SWITCH_LINEAR_PLUGIN_H
#define ADAFUSE_SWITCH_LINEAR_PLUGIN_H

#include "adafuseLinearPluginBase.h"

namespace adafuse
{
namespace plugin
{

constexpr char const* kSWITCH_LINEAR_PLUGIN_NAME = "AdafuseSwitchLinear";
constexpr char const* kSWITCH_LINEAR_PLUGIN_VERSION = "1";
constexpr char const* kSWITCH_LINEAR_PLUGIN_NAMESPACE = "";

class AdafuseSwitchLinearPlugin : public LinearPluginBase
{
public:
    explicit AdafuseSwitchLinearPlugin(LinearConfig const& config);
    ~AdafuseSwitchLinearPlugin() override;

    nvinfer1::IPluginV3* clone() noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    void attached() override;

private:
    //! Route state and site record on the current device (outside capture).
    void allocateRouteState();
    //! W_merged for `type` on `device`, allocated outside capture only (throws under capture).
    void ensureMerged(nvinfer1::DataType type, int device, bool capturing, cudaStream_t stream);
    void releaseDeviceState() noexcept;

    // Device state, owned by this instance only (never shared by clones).
    int mDevice{-1};                           // device of the state below, -1 = none yet
    adafuse_switch_site* mSiteDev{nullptr};    // one site record (zeroed = "no weights yet")
    int32_t* mOldIds{nullptr};                 // [top_k], -1 = nothing merged
    float* mOldGates{nullptr};                 // [top_k]
    void* mMerged{nullptr};                    // [out, in] of mMergedType
    nvinfer1::DataType mMergedType{nvinfer1::DataType::kFLOAT};
    // The site last written outside capture (skips the rewrite kernel while it is unchanged).
    bool mSiteKnown{false};
    adafuse_switch_site mSiteHost{};
};

class AdafuseSwitchLinearPluginCreator : public LinearPluginCreator
{
public:
    AdafuseSwitchLinearPluginCreator();
    ~AdafuseSwitchLinearPluginCreator() override = default;

protected:
    nvinfer1::IPluginV3* create(LinearConfig const& config) const override;
};

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_SWITCH_LINEAR_PLUGIN_H
