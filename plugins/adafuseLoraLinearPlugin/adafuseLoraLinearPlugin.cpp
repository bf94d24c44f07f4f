#include "adafuseLoraLinearPlugin.h"

namespace adafuse
{
namespace plugin
{
namespace
{
constexpr char const* kName = kLORA_LINEAR_PLUGIN_NAME;
}

AdafuseLoraLinearPlugin::AdafuseLoraLinearPlugin(LinearConfig const& config)
    : mConfig(config)
{
}

nvinfer1::IPluginCapability* AdafuseLoraLinearPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept
{
    return guarded<nvinfer1::IPluginCapability*>(kName, "getCapabilityInterface", nullptr,
        [&]() -> nvinfer1::IPluginCapability* {
            switch (type)
            {
            case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
            case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
            case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
            }
            throw PluginError(str(kName, ": unknown capability type ", static_cast<int32_t>(type)));
        });
}

nvinfer1::IPluginV3* AdafuseLoraLinearPlugin::clone() noexcept
{
    return guarded<nvinfer1::IPluginV3*>(
        kName, "clone", nullptr, [&]() -> nvinfer1::IPluginV3* { return new AdafuseLoraLinearPlugin(mConfig); });
}

char const* AdafuseLoraLinearPlugin::getPluginName() const noexcept
{
    return kLORA_LINEAR_PLUGIN_NAME;
}

char const* AdafuseLoraLinearPlugin::getPluginVersion() const noexcept
{
    return kLORA_LINEAR_PLUGIN_VERSION;
}

char const* AdafuseLoraLinearPlugin::getPluginNamespace() const noexcept
{
    return kLORA_LINEAR_PLUGIN_NAMESPACE;
}

int32_t AdafuseLoraLinearPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guarded<int32_t>(kName, "configurePlugin", -1, [&]() {
        mConfig.checkTensors(in, nbInputs, out, nbOutputs);
        return 0;
    });
}

int32_t AdafuseLoraLinearPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guarded<int32_t>(kName, "getOutputDataTypes", -1, [&]() {
        mConfig.outputDataTypes(outputTypes, nbOutputs, inputTypes, nbInputs);
        return 0;
    });
}

int32_t AdafuseLoraLinearPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    return guarded<int32_t>(kName, "getOutputShapes", -1, [&]() {
        check(nbShapeInputs == 0, kName, "expected no shape inputs, found ", nbShapeInputs);
        mConfig.outputShapes(inputs, nbInputs, outputs, nbOutputs, exprBuilder);
        return 0;
    });
}

bool AdafuseLoraLinearPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guarded<bool>(kName, "supportsFormatCombination", false,
        [&]() { return mConfig.supportsFormatCombination(pos, inOut, nbInputs, nbOutputs); });
}

int32_t AdafuseLoraLinearPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

size_t AdafuseLoraLinearPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // 0 on error: the error is logged and enqueue then fails with a clear message.
    return guarded<size_t>(
        kName, "getWorkspaceSize", 0, [&]() { return mConfig.loraWorkspaceSize(inputs, nbInputs); });
}

int32_t AdafuseLoraLinearPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guarded<int32_t>(kName, "onShapeChange", -1, [&]() {
        mConfig.checkTensors(in, nbInputs, out, nbOutputs);
        return 0;
    });
}

int32_t AdafuseLoraLinearPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream) noexcept
{
    return guarded<int32_t>(kName, "enqueue", -1, [&]() {
        check(inputDesc != nullptr && inputs != nullptr && outputs != nullptr, kName, "null tensor arrays");
        LinearFields const& f = mConfig.fields();
        int32_t const rows = mConfig.rows(inputDesc[kINPUT_X].dims);
        if (rows == 0)
        {
            return 0;
        }
        // The engine's workspace was sized for the profile's largest row count; the
        // kernels need (and are told about) the size for the current row count.
        size_t const wsBytes
            = adafuse_lora_linear_workspace_size(rows, f.inFeatures, f.outFeatures, f.numExperts, f.rank, f.topK);
        check(wsBytes == 0 || workspace != nullptr, kName, "workspace of ", wsBytes, " bytes needed but none given");
        int const status = adafuse_lora_linear(toKernelDtype(inputDesc[kINPUT_X].type, kName), rows, f.inFeatures,
            f.outFeatures, inputs[kINPUT_X], inputs[kINPUT_W], f.hasBias ? inputs[kINPUT_BIAS] : nullptr,
            inputs[kINPUT_A], inputs[kINPUT_B], f.numExperts, f.rank,
            static_cast<int32_t const*>(inputs[kINPUT_EXPERT_IDS]), static_cast<float const*>(inputs[kINPUT_GATES]),
            f.topK, f.scale, outputs[kOUTPUT_Y], workspace, wsBytes, stream);
        check(status == ADAFUSE_OK, kName, "adafuse_lora_linear failed: ", adafuse_status_string(status), " (rows=",
            rows, ")");
        return 0;
    });
}

nvinfer1::IPluginV3* AdafuseLoraLinearPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

nvinfer1::PluginFieldCollection const* AdafuseLoraLinearPlugin::getFieldsToSerialize() noexcept
{
    return guarded<nvinfer1::PluginFieldCollection const*>(
        kName, "getFieldsToSerialize", nullptr, [&]() { return mConfig.fieldsToSerialize(); });
}

// ---- creator -----------------------------------------------------------------

char const* AdafuseLoraLinearPluginCreator::getPluginName() const noexcept
{
    return kLORA_LINEAR_PLUGIN_NAME;
}

char const* AdafuseLoraLinearPluginCreator::getPluginVersion() const noexcept
{
    return kLORA_LINEAR_PLUGIN_VERSION;
}

char const* AdafuseLoraLinearPluginCreator::getPluginNamespace() const noexcept
{
    return kLORA_LINEAR_PLUGIN_NAMESPACE;
}

nvinfer1::PluginFieldCollection const* AdafuseLoraLinearPluginCreator::getFieldNames() noexcept
{
    return LinearConfig::fieldNames();
}

nvinfer1::IPluginV3* AdafuseLoraLinearPluginCreator::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    return guarded<nvinfer1::IPluginV3*>(kName, "createPlugin", nullptr, [&]() -> nvinfer1::IPluginV3* {
        return new AdafuseLoraLinearPlugin(LinearConfig::fromFieldCollection(kName, fc));
    });
}

} // namespace plugin
} // namespace adafuse
