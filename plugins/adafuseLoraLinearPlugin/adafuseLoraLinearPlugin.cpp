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
        enqueueLoraLinear(inputDesc, rows, inputs, outputs, workspace, stream);
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
