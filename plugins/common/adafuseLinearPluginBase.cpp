#include "adafuseLinearPluginBase.h"

#include <algorithm>

namespace adafuse
{
namespace plugin
{

LinearPluginBase::LinearPluginBase(PluginIdentity const& identity, LinearConfig const& config)
    : mIdentity(identity)
    , mConfig(config)
{
}

nvinfer1::IPluginCapability* LinearPluginBase::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    return guarded<nvinfer1::IPluginCapability*>(name(), "getCapabilityInterface", nullptr,
        [&]() -> nvinfer1::IPluginCapability* {
            switch (type)
            {
            case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
            case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
            case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
            }
            throw PluginError(str(name(), ": unknown capability type ", static_cast<int32_t>(type)));
        });
}

char const* LinearPluginBase::getPluginName() const noexcept
{
    return mIdentity.name;
}

char const* LinearPluginBase::getPluginVersion() const noexcept
{
    return mIdentity.version;
}

char const* LinearPluginBase::getPluginNamespace() const noexcept
{
    return mIdentity.pluginNamespace;
}

int32_t LinearPluginBase::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guarded<int32_t>(name(), "configurePlugin", -1, [&]() {
        mConfig.checkTensors(in, nbInputs, out, nbOutputs);
        return 0;
    });
}

int32_t LinearPluginBase::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guarded<int32_t>(name(), "getOutputDataTypes", -1, [&]() {
        mConfig.outputDataTypes(outputTypes, nbOutputs, inputTypes, nbInputs);
        return 0;
    });
}

int32_t LinearPluginBase::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    return guarded<int32_t>(name(), "getOutputShapes", -1, [&]() {
        check(nbShapeInputs == 0, name(), "expected no shape inputs, found ", nbShapeInputs);
        mConfig.outputShapes(inputs, nbInputs, outputs, nbOutputs, exprBuilder);
        return 0;
    });
}

bool LinearPluginBase::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guarded<bool>(name(), "supportsFormatCombination", false,
        [&]() { return mConfig.supportsFormatCombination(pos, inOut, nbInputs, nbOutputs); });
}

int32_t LinearPluginBase::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

int32_t LinearPluginBase::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    // Checks only: TensorRT may call this lazily inside enqueueV3, under stream capture,
    // where nothing may be allocated (device state comes from attachToContext).
    return guarded<int32_t>(name(), "onShapeChange", -1, [&]() {
        mConfig.checkTensors(in, nbInputs, out, nbOutputs);
        return 0;
    });
}

nvinfer1::IPluginV3* LinearPluginBase::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return guarded<nvinfer1::IPluginV3*>(name(), "attachToContext", nullptr, [&]() -> nvinfer1::IPluginV3* {
        // An execution context runs the kernels: no driver, or one below the build's floor, is refused.
        requireDriver(name(), /*allowNoDriver=*/false);
        nvinfer1::IPluginV3* const copy = clone();
        check(copy != nullptr, name(), "clone failed");
        auto* plugin = static_cast<LinearPluginBase*>(copy); // clone() always makes this class's type
        try
        {
            plugin->attached();
        }
        catch (...)
        {
            delete copy;
            throw;
        }
        return copy;
    });
}

void LinearPluginBase::attached()
{
    mAttached = true;
    if (ExpertIdCheck::enabled())
    {
        mIdCheck.allocate(name());
    }
}

void LinearPluginBase::checkExpertIds(int32_t rows, void const* const* inputs, cudaStream_t stream)
{
    if (mAttached && ExpertIdCheck::enabled())
    {
        LinearFields const& f = mConfig.fields();
        mIdCheck.run(name(), static_cast<int32_t const*>(inputs[kINPUT_EXPERT_IDS]), rows, f.topK, f.numExperts,
            stream);
    }
}

nvinfer1::PluginFieldCollection const* LinearPluginBase::getFieldsToSerialize() noexcept
{
    return guarded<nvinfer1::PluginFieldCollection const*>(
        name(), "getFieldsToSerialize", nullptr, [&]() { return mConfig.fieldsToSerialize(); });
}

void const* LinearPluginBase::biasInput(void const* const* inputs) const noexcept
{
    return mConfig.fields().hasBias ? inputs[kINPUT_BIAS] : nullptr;
}

void LinearPluginBase::enqueueLoraLinear(nvinfer1::PluginTensorDesc const* inputDesc, int32_t rows,
    void const* const* inputs, void* const* outputs, void* workspace, bool exclusiveWorkspace,
    cudaStream_t stream) const
{
    LinearFields const& f = mConfig.fields();
    adafuse_lora_options options{};
    options.exclusive_workspace = exclusiveWorkspace ? 1 : 0;
    if (mConfig.fp8Weights())
    {
        // W is the engine's FP8 constant, read as one byte per weight and scaled per output row by the kernels.
        options.weight_dtype = ADAFUSE_WEIGHT_FP8_E4M3;
        options.weight_scale = static_cast<float const*>(inputs[mConfig.weightScaleIndex()]);
    }
    nvinfer1::DataType const type = inputDesc[kINPUT_X].type;
    adafuse_dtype const dtype = toKernelDtype(type, name());
    size_t const es = dataTypeSize(type, name());
    // Rows are independent: a long prefill runs in chunks of kLORA_CHUNK_ROWS rows, each within
    // the kernel's row limit and the workspace getWorkspaceSize gave for one chunk. The kernels
    // are told the workspace size of the current chunk, never more than the engine provides.
    for (int32_t r0 = 0; r0 < rows; r0 += kLORA_CHUNK_ROWS)
    {
        int32_t const n = std::min(kLORA_CHUNK_ROWS, rows - r0);
        size_t const wsBytes
            = adafuse_lora_linear_workspace_size(n, f.inFeatures, f.outFeatures, f.numExperts, f.rank, f.topK);
        check(wsBytes == 0 || workspace != nullptr, name(), "workspace of ", wsBytes, " bytes needed but none given");
        size_t const r = static_cast<size_t>(r0);
        int const status = adafuse_lora_linear(dtype, n, f.inFeatures, f.outFeatures,
            static_cast<char const*>(inputs[kINPUT_X]) + r * f.inFeatures * es, inputs[kINPUT_W], biasInput(inputs),
            inputs[kINPUT_A], inputs[kINPUT_B], f.numExperts, f.rank,
            static_cast<int32_t const*>(inputs[kINPUT_EXPERT_IDS]) + r * f.topK,
            static_cast<float const*>(inputs[kINPUT_GATES]) + r * f.topK, f.topK, f.scale,
            static_cast<char*>(outputs[kOUTPUT_Y]) + r * f.outFeatures * es, workspace, wsBytes, &options, stream);
        check(status == ADAFUSE_OK, name(), "adafuse_lora_linear failed: ", adafuse_status_string(status),
            " (rows ", r0, "..", r0 + n, " of ", rows, ")");
    }
}

// ---- creator -----------------------------------------------------------------

LinearPluginCreator::LinearPluginCreator(PluginIdentity const& identity)
    : mIdentity(identity)
{
}

char const* LinearPluginCreator::getPluginName() const noexcept
{
    return mIdentity.name;
}

char const* LinearPluginCreator::getPluginVersion() const noexcept
{
    return mIdentity.version;
}

char const* LinearPluginCreator::getPluginNamespace() const noexcept
{
    return mIdentity.pluginNamespace;
}

nvinfer1::PluginFieldCollection const* LinearPluginCreator::getFieldNames() noexcept
{
    return LinearConfig::fieldNames();
}

nvinfer1::IPluginV3* LinearPluginCreator::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    return guarded<nvinfer1::IPluginV3*>(mIdentity.name, "createPlugin", nullptr, [&]() -> nvinfer1::IPluginV3* {
        requireDriver(mIdentity.name, /*allowNoDriver=*/true);
        return create(LinearConfig::fromFieldCollection(mIdentity.name, fc));
    });
}

} // namespace plugin
} // namespace adafuse
