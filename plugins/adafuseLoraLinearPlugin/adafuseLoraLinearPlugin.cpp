#include "adafuseLoraLinearPlugin.h"

namespace adafuse
{
namespace plugin
{
namespace
{
constexpr char const* kName = kLORA_LINEAR_PLUGIN_NAME;
constexpr PluginIdentity kIdentity{kLORA_LINEAR_PLUGIN_NAME, kLORA_LINEAR_PLUGIN_VERSION, kLORA_LINEAR_PLUGIN_NAMESPACE};
} // namespace

AdafuseLoraLinearPlugin::AdafuseLoraLinearPlugin(LinearConfig const& config)
    : LinearPluginBase(kIdentity, config)
{
}

AdafuseLoraLinearPlugin::~AdafuseLoraLinearPlugin()
{
    if (mOneRowWorkspace != nullptr)
        cudaFree(mOneRowWorkspace); // nothing useful can be done with an error in a destructor
}

void AdafuseLoraLinearPlugin::attached()
{
    LinearPluginBase::attached();
    if (mOneRowWorkspace != nullptr)
        return;
    LinearFields const& f = mConfig.fields();
    size_t const bytes = adafuse_lora_linear_workspace_size(1, f.inFeatures, f.outFeatures, f.numExperts, f.rank, f.topK);
    check(bytes > 0, kName, "no one-row workspace size for the fields (adafuse_lora_linear_workspace_size gave 0)");
    auto cudaCheck = [](cudaError_t e, char const* what) {
        if (e != cudaSuccess)
        {
            (void) cudaGetLastError(); // consumed: reported here, not again by a later launch check
            throw PluginError(str(kName, ": ", what, " failed: ", cudaGetErrorString(e)));
        }
    };
    cudaCheck(cudaGetDevice(&mDevice), "cudaGetDevice");
    cudaCheck(cudaMalloc(&mOneRowWorkspace, bytes), "cudaMalloc(one-row workspace)");
}

nvinfer1::IPluginV3* AdafuseLoraLinearPlugin::clone() noexcept
{
    return cloneAs<AdafuseLoraLinearPlugin>();
}

size_t AdafuseLoraLinearPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // 0 on error: the error is logged and enqueue then fails with a clear message.
    return guarded<size_t>(
        kName, "getWorkspaceSize", 0, [&]() { return mConfig.loraWorkspaceSize(inputs, nbInputs); });
}

int32_t AdafuseLoraLinearPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream) noexcept
{
    return guarded<int32_t>(kName, "enqueue", -1, [&]() {
        check(inputDesc != nullptr && inputs != nullptr && outputs != nullptr, kName, "null tensor arrays");
        int32_t const rows = mConfig.rows(inputDesc[kINPUT_X].dims);
        if (rows == 0)
        {
            return 0;
        }
        checkExpertIds(rows, inputs, stream);
        if (rows == 1 && mOneRowWorkspace != nullptr)
        {
            // The instance's own workspace (see the header): exclusive, so the shrink may launch early.
            bool const capturing = streamIsCapturing(stream, kName);
            int const device = streamDevice(stream, capturing, kName);
            check(device == mDevice, kName, "enqueue on a stream of device ", device,
                ", but this instance's one-row workspace is on device ", mDevice,
                " (one execution context runs on one device)");
            enqueueLoraLinear(inputDesc, rows, inputs, outputs, mOneRowWorkspace, /*exclusiveWorkspace=*/true, stream);
            return 0;
        }
        enqueueLoraLinear(inputDesc, rows, inputs, outputs, workspace, /*exclusiveWorkspace=*/false, stream);
        return 0;
    });
}

// ---- creator -----------------------------------------------------------------

AdafuseLoraLinearPluginCreator::AdafuseLoraLinearPluginCreator()
    : LinearPluginCreator(kIdentity)
{
}

nvinfer1::IPluginV3* AdafuseLoraLinearPluginCreator::create(LinearConfig const& config) const
{
    return new AdafuseLoraLinearPlugin(config);
}

} // namespace plugin
} // namespace adafuse
