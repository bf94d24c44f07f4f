#include "adafuseSwitchLinearPlugin.h"
#include "adafuseSwitchLinearKernels.h"

#include <cstring>

namespace adafuse
{
namespace plugin
{
namespace
{
constexpr char const* kName = kSWITCH_LINEAR_PLUGIN_NAME;

void cudaCheck(cudaError_t e, char const* what)
{
    check(e == cudaSuccess, kName, what, " failed: ", cudaGetErrorString(e));
}

bool sameSite(adafuse_switch_site const& a, adafuse_switch_site const& b)
{
    return a.W == b.W && a.W_base == b.W_base && a.A == b.A && a.B == b.B && a.out_features == b.out_features
        && a.in_features == b.in_features && a.rank == b.rank && a.num_experts == b.num_experts
        && std::memcmp(&a.scale, &b.scale, sizeof(float)) == 0;
}
} // namespace

AdafuseSwitchLinearPlugin::AdafuseSwitchLinearPlugin(LinearConfig const& config)
    : mConfig(config)
{
}

AdafuseSwitchLinearPlugin::~AdafuseSwitchLinearPlugin()
{
    releaseDeviceState();
}

void AdafuseSwitchLinearPlugin::releaseDeviceState() noexcept
{
    // Errors while freeing are ignored: nothing useful can be done in a destructor.
    if (mMerged != nullptr)
        cudaFree(mMerged);
    if (mSiteDev != nullptr)
        cudaFree(mSiteDev);
    if (mOldIds != nullptr)
        cudaFree(mOldIds);
    if (mOldGates != nullptr)
        cudaFree(mOldGates);
    mMerged = nullptr;
    mSiteDev = nullptr;
    mOldIds = nullptr;
    mOldGates = nullptr;
    mRouteResetEnqueued = false;
    mSiteValid = false;
}

void AdafuseSwitchLinearPlugin::ensureDeviceState(nvinfer1::DataType type)
{
    if (mMerged != nullptr && mMergedType == type)
    {
        return;
    }
    releaseDeviceState();
    LinearFields const& f = mConfig.fields();
    size_t const bytes = static_cast<size_t>(f.outFeatures) * f.inFeatures * dataTypeSize(type, kName);
    cudaCheck(cudaMalloc(&mMerged, bytes), "cudaMalloc(merged W)");
    cudaCheck(cudaMalloc(reinterpret_cast<void**>(&mSiteDev), sizeof(adafuse_switch_site)), "cudaMalloc(site)");
    cudaCheck(cudaMalloc(reinterpret_cast<void**>(&mOldIds), sizeof(int32_t) * f.topK), "cudaMalloc(route ids)");
    cudaCheck(cudaMalloc(reinterpret_cast<void**>(&mOldGates), sizeof(float) * f.topK), "cudaMalloc(route gates)");
    mMergedType = type;
    // The route reset and the site record are written on the enqueue stream (see enqueue).
}

nvinfer1::IPluginCapability* AdafuseSwitchLinearPlugin::getCapabilityInterface(
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

nvinfer1::IPluginV3* AdafuseSwitchLinearPlugin::clone() noexcept
{
    // Fields only: the clone allocates its own merged weight and route state.
    return guarded<nvinfer1::IPluginV3*>(
        kName, "clone", nullptr, [&]() -> nvinfer1::IPluginV3* { return new AdafuseSwitchLinearPlugin(mConfig); });
}

char const* AdafuseSwitchLinearPlugin::getPluginName() const noexcept
{
    return kSWITCH_LINEAR_PLUGIN_NAME;
}

char const* AdafuseSwitchLinearPlugin::getPluginVersion() const noexcept
{
    return kSWITCH_LINEAR_PLUGIN_VERSION;
}

char const* AdafuseSwitchLinearPlugin::getPluginNamespace() const noexcept
{
    return kSWITCH_LINEAR_PLUGIN_NAMESPACE;
}

int32_t AdafuseSwitchLinearPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guarded<int32_t>(kName, "configurePlugin", -1, [&]() {
        mConfig.checkTensors(in, nbInputs, out, nbOutputs);
        return 0;
    });
}

int32_t AdafuseSwitchLinearPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guarded<int32_t>(kName, "getOutputDataTypes", -1, [&]() {
        mConfig.outputDataTypes(outputTypes, nbOutputs, inputTypes, nbInputs);
        return 0;
    });
}

int32_t AdafuseSwitchLinearPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    return guarded<int32_t>(kName, "getOutputShapes", -1, [&]() {
        check(nbShapeInputs == 0, kName, "expected no shape inputs, found ", nbShapeInputs);
        mConfig.outputShapes(inputs, nbInputs, outputs, nbOutputs, exprBuilder);
        return 0;
    });
}

bool AdafuseSwitchLinearPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guarded<bool>(kName, "supportsFormatCombination", false,
        [&]() { return mConfig.supportsFormatCombination(pos, inOut, nbInputs, nbOutputs); });
}

int32_t AdafuseSwitchLinearPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

size_t AdafuseSwitchLinearPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // Only the multi-row (unmerged) path needs a workspace.
    return guarded<size_t>(kName, "getWorkspaceSize", 0, [&]() -> size_t {
        check(inputs != nullptr && nbInputs == mConfig.nbInputs(), kName, "expected ", mConfig.nbInputs(),
            " inputs, found ", nbInputs);
        if (mConfig.rows(inputs[kINPUT_X].max) <= 1)
        {
            return 0;
        }
        return mConfig.loraWorkspaceSize(inputs, nbInputs);
    });
}

int32_t AdafuseSwitchLinearPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guarded<int32_t>(kName, "onShapeChange", -1, [&]() {
        mConfig.checkTensors(in, nbInputs, out, nbOutputs);
        // Allocate here (outside enqueue, so that a captured CUDA graph holds no allocation).
        if (mConfig.rows(in[kINPUT_X].dims) == 1)
        {
            ensureDeviceState(in[kINPUT_X].type);
        }
        return 0;
    });
}

int32_t AdafuseSwitchLinearPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream) noexcept
{
    return guarded<int32_t>(kName, "enqueue", -1, [&]() {
        check(inputDesc != nullptr && inputs != nullptr && outputs != nullptr, kName, "null tensor arrays");
        LinearFields const& f = mConfig.fields();
        nvinfer1::DataType const type = inputDesc[kINPUT_X].type;
        adafuse_dtype const dtype = toKernelDtype(type, kName);
        int32_t const rows = mConfig.rows(inputDesc[kINPUT_X].dims);
        void const* bias = f.hasBias ? inputs[kINPUT_BIAS] : nullptr;
        if (rows == 0)
        {
            return 0;
        }
        if (rows > 1)
        {
            // Prefill: rows may carry different routes, so no merge; the merged state is untouched.
            size_t const wsBytes = adafuse_lora_linear_workspace_size(
                rows, f.inFeatures, f.outFeatures, f.numExperts, f.rank, f.topK);
            check(wsBytes == 0 || workspace != nullptr, kName, "workspace of ", wsBytes,
                " bytes needed but none given");
            int const status = adafuse_lora_linear(dtype, rows, f.inFeatures, f.outFeatures, inputs[kINPUT_X],
                inputs[kINPUT_W], bias, inputs[kINPUT_A], inputs[kINPUT_B], f.numExperts, f.rank,
                static_cast<int32_t const*>(inputs[kINPUT_EXPERT_IDS]),
                static_cast<float const*>(inputs[kINPUT_GATES]), f.topK, f.scale, outputs[kOUTPUT_Y], workspace,
                wsBytes, stream);
            check(status == ADAFUSE_OK, kName, "adafuse_lora_linear failed: ", adafuse_status_string(status),
                " (rows=", rows, ")");
            return 0;
        }

        ensureDeviceState(type); // normally done by onShapeChange already
        adafuse_switch_site site{};
        site.W = mMerged;
        site.W_base = inputs[kINPUT_W]; // read only: W_merged is re-derived from it
        site.A = inputs[kINPUT_A];
        site.B = inputs[kINPUT_B];
        site.out_features = f.outFeatures;
        site.in_features = f.inFeatures;
        site.rank = f.rank;
        site.num_experts = f.numExperts;
        site.scale = f.scale;
        site.reserved = 0;
        if (!mSiteValid || !sameSite(site, mSiteHost))
        {
            cudaCheck(launchWriteSite(mSiteDev, site, stream), "writing the switch site");
            mSiteHost = site;
            mSiteValid = true;
            mRouteResetEnqueued = false; // new weights: whatever was merged is stale
        }
        if (!mRouteResetEnqueued)
        {
            // old_ids = -1: "nothing merged", so the next switch always writes W_merged.
            cudaCheck(cudaMemsetAsync(mOldIds, 0xFF, sizeof(int32_t) * f.topK, stream), "resetting the route");
            cudaCheck(cudaMemsetAsync(mOldGates, 0, sizeof(float) * f.topK, stream), "resetting the route");
            mRouteResetEnqueued = true;
        }
        int const status = adafuse_switch(dtype, mSiteDev, 1, f.outFeatures, f.inFeatures,
            static_cast<int32_t const*>(inputs[kINPUT_EXPERT_IDS]), static_cast<float const*>(inputs[kINPUT_GATES]),
            mOldIds, mOldGates, f.topK, /*update_old=*/1, stream);
        check(status == ADAFUSE_OK, kName, "adafuse_switch failed: ", adafuse_status_string(status));
        cudaCheck(launchDenseLinear(dtype, 1, f.inFeatures, f.outFeatures, inputs[kINPUT_X], mMerged, bias,
                      outputs[kOUTPUT_Y], stream),
            "dense GEMV on the merged weight");
        return 0;
    });
}

nvinfer1::IPluginV3* AdafuseSwitchLinearPlugin::attachToContext(
    nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    // Each execution context gets its own merged weight and route state.
    return clone();
}

nvinfer1::PluginFieldCollection const* AdafuseSwitchLinearPlugin::getFieldsToSerialize() noexcept
{
    return guarded<nvinfer1::PluginFieldCollection const*>(
        kName, "getFieldsToSerialize", nullptr, [&]() { return mConfig.fieldsToSerialize(); });
}

// ---- creator -----------------------------------------------------------------

char const* AdafuseSwitchLinearPluginCreator::getPluginName() const noexcept
{
    return kSWITCH_LINEAR_PLUGIN_NAME;
}

char const* AdafuseSwitchLinearPluginCreator::getPluginVersion() const noexcept
{
    return kSWITCH_LINEAR_PLUGIN_VERSION;
}

char const* AdafuseSwitchLinearPluginCreator::getPluginNamespace() const noexcept
{
    return kSWITCH_LINEAR_PLUGIN_NAMESPACE;
}

nvinfer1::PluginFieldCollection const* AdafuseSwitchLinearPluginCreator::getFieldNames() noexcept
{
    return LinearConfig::fieldNames();
}

nvinfer1::IPluginV3* AdafuseSwitchLinearPluginCreator::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    return guarded<nvinfer1::IPluginV3*>(kName, "createPlugin", nullptr, [&]() -> nvinfer1::IPluginV3* {
        return new AdafuseSwitchLinearPlugin(LinearConfig::fromFieldCollection(kName, fc));
    });
}

} // namespace plugin
} // namespace adafuse
