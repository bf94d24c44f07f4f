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
constexpr PluginIdentity kIdentity{
    kSWITCH_LINEAR_PLUGIN_NAME, kSWITCH_LINEAR_PLUGIN_VERSION, kSWITCH_LINEAR_PLUGIN_NAMESPACE};

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
    : LinearPluginBase(kIdentity, config)
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

nvinfer1::IPluginV3* AdafuseSwitchLinearPlugin::clone() noexcept
{
    // Fields only: the clone allocates its own merged weight and route state.
    return cloneAs<AdafuseSwitchLinearPlugin>();
}

size_t AdafuseSwitchLinearPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // Only the multi-row (unmerged) path needs a workspace.
    return guarded<size_t>(kName, "getWorkspaceSize", 0, [&]() -> size_t {
        check(inputs != nullptr && nbInputs == mConfig.nbInputs(), kName, "expected ", mConfig.nbInputs(),
            " inputs, found ", nbInputs);
        if (LinearConfig::maxRows(inputs[kINPUT_X].max) <= 1)
        {
            return 0;
        }
        return mConfig.loraWorkspaceSize(inputs, nbInputs);
    });
}

void AdafuseSwitchLinearPlugin::shapeChanged(nvinfer1::PluginTensorDesc const* in, int32_t /*nbInputs*/)
{
    // Allocate here (outside enqueue, so that a captured CUDA graph holds no allocation).
    if (mConfig.rows(in[kINPUT_X].dims) == 1)
    {
        ensureDeviceState(in[kINPUT_X].type);
    }
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
        void const* bias = biasInput(inputs);
        if (rows == 0)
        {
            return 0;
        }
        if (rows > 1)
        {
            // Prefill: rows may carry different routes, so no merge; the merged state is untouched.
            enqueueLoraLinear(inputDesc, rows, inputs, outputs, workspace, stream);
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

// ---- creator -----------------------------------------------------------------

AdafuseSwitchLinearPluginCreator::AdafuseSwitchLinearPluginCreator()
    : LinearPluginCreator(kIdentity)
{
}

nvinfer1::IPluginV3* AdafuseSwitchLinearPluginCreator::create(LinearConfig const& config) const
{
    return new AdafuseSwitchLinearPlugin(config);
}

} // namespace plugin
} // namespace adafuse
