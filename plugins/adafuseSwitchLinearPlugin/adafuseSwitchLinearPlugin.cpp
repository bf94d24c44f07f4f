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
    if (e != cudaSuccess)
    {
        (void) cudaGetLastError(); // consumed: reported here, not again by a later launch check
        throw PluginError(str(kName, ": ", what, " failed: ", cudaGetErrorString(e)));
    }
}

bool sameSite(adafuse_switch_site const& a, adafuse_switch_site const& b)
{
    return a.W == b.W && a.W_base == b.W_base && a.A == b.A && a.B == b.B && a.out_features == b.out_features
        && a.in_features == b.in_features && a.rank == b.rank && a.num_experts == b.num_experts
        && std::memcmp(&a.scale, &b.scale, sizeof(float)) == 0 && a.base_dtype == b.base_dtype
        && a.base_scale == b.base_scale;
}

//! Makes `device` current for its scope (allocations go to the current device).
class DeviceGuard
{
public:
    explicit DeviceGuard(int device)
    {
        cudaCheck(cudaGetDevice(&mPrevious), "cudaGetDevice");
        if (device != mPrevious)
            cudaCheck(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceGuard()
    {
        int current = -1;
        if (cudaGetDevice(&current) == cudaSuccess && current != mPrevious)
            cudaSetDevice(mPrevious);
    }
    DeviceGuard(DeviceGuard const&) = delete;
    DeviceGuard& operator=(DeviceGuard const&) = delete;

private:
    int mPrevious{0};
};
} // namespace

AdafuseSwitchLinearPlugin::AdafuseSwitchLinearPlugin(LinearConfig const& config)
    : LinearPluginBase(kIdentity, config)
{
    // adafuse_switch takes an FP8 W_base, but this plugin does not: its inputs carry no weight_scale for its
    // switch path, and its prefill rows run adafuse_lora_linear on W of x's dtype. The native backend's switch
    // strategy runs FP8 weights.
    check(!config.fp8Weights(), kName, "field 'weight_dtype' = 1 (fp8 W): this plugin's switch takes W in the dtype "
        "of x only (no weight_scale input); FP8 weights run with AdafuseLoraLinear (--strategy fused) or on the "
        "native backend (convert --native, run --strategy switch)");
}

AdafuseSwitchLinearPlugin::~AdafuseSwitchLinearPlugin()
{
    releaseDeviceState();
}

void AdafuseSwitchLinearPlugin::releaseDeviceState() noexcept
{
    // Errors while freeing are ignored: nothing useful can be done in a destructor.
    for (void* p : {static_cast<void*>(mMerged), static_cast<void*>(mSiteDev), static_cast<void*>(mOldIds),
             static_cast<void*>(mOldGates)})
    {
        if (p != nullptr)
            cudaFree(p);
    }
    mMerged = nullptr;
    mSiteDev = nullptr;
    mOldIds = nullptr;
    mOldGates = nullptr;
    mDevice = -1;
    mSiteKnown = false;
}

void AdafuseSwitchLinearPlugin::attached()
{
    LinearPluginBase::attached();
    allocateRouteState();
}

void AdafuseSwitchLinearPlugin::allocateRouteState()
{
    if (mSiteDev != nullptr)
        return;
    int32_t const k = mConfig.fields().topK;
    cudaCheck(cudaGetDevice(&mDevice), "cudaGetDevice");
    cudaCheck(cudaMalloc(reinterpret_cast<void**>(&mSiteDev), sizeof(adafuse_switch_site)), "cudaMalloc(site)");
    cudaCheck(cudaMalloc(reinterpret_cast<void**>(&mOldIds), sizeof(int32_t) * k), "cudaMalloc(route ids)");
    cudaCheck(cudaMalloc(reinterpret_cast<void**>(&mOldGates), sizeof(float) * k), "cudaMalloc(route gates)");
    // A zeroed site matches no real weights; old_ids = -1 means "nothing merged".
    cudaCheck(cudaMemset(mSiteDev, 0, sizeof(adafuse_switch_site)), "cudaMemset(site)");
    cudaCheck(cudaMemset(mOldIds, 0xFF, sizeof(int32_t) * k), "cudaMemset(route ids)");
    cudaCheck(cudaMemset(mOldGates, 0, sizeof(float) * k), "cudaMemset(route gates)");
    cudaCheck(cudaStreamSynchronize(cudaStreamLegacy), "initialising the route state");
}

void AdafuseSwitchLinearPlugin::ensureMerged(nvinfer1::DataType type, int device, bool capturing, cudaStream_t stream)
{
    if (mMerged != nullptr && mMergedType == type)
        return;
    LinearFields const& f = mConfig.fields();
    size_t const bytes = static_cast<size_t>(f.outFeatures) * f.inFeatures * dataTypeSize(type, kName);
    check(!capturing, kName, "enqueue with one row is being captured into a CUDA graph, but the merged weight (",
        bytes, " bytes of ", dataTypeName(type), " on device ", device,
        ") is not allocated yet and cannot be inside a capture: run one enqueue (enqueueV3) with this shape outside "
        "capture first, as TensorRT asks after every shape change before capturing a graph");
    if (mMerged != nullptr)
    {
        cudaCheck(cudaFree(mMerged), "cudaFree(merged W)");
        mMerged = nullptr;
    }
    DeviceGuard onStreamDevice(device);
    cudaCheck(cudaMalloc(&mMerged, bytes), "cudaMalloc(merged W)");
    mMergedType = type;
    // Nothing is merged into the new buffer: the next switch must write all of it.
    cudaCheck(cudaMemsetAsync(mOldIds, 0xFF, sizeof(int32_t) * f.topK, stream), "resetting the route");
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
        checkExpertIds(rows, inputs, stream);
        if (rows > 1)
        {
            // Prefill: rows may carry different routes, so no merge; the merged state is untouched.
            enqueueLoraLinear(inputDesc, rows, inputs, outputs, workspace, /*exclusiveWorkspace=*/false, stream);
            return 0;
        }

        bool const capturing = streamIsCapturing(stream, kName);
        int const device = streamDevice(stream, capturing, kName);
        if (mSiteDev == nullptr)
        {
            // A build-time instance (TensorRT's timing runs): no attachToContext came first.
            check(!capturing, kName, "enqueue is being captured into a CUDA graph before the plugin was attached to "
                                     "an execution context (no route state; none can be allocated inside a capture)");
            DeviceGuard onStreamDevice(device);
            allocateRouteState();
        }
        check(device == mDevice, kName, "enqueue on a stream of device ", device, ", but this instance's state is on "
            "device ", mDevice, " (one execution context runs on one device)");
        ensureMerged(type, device, capturing, stream);

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
        site.base_dtype = ADAFUSE_WEIGHT_AS_DTYPE; // W of x's dtype: the constructor refuses FP8 W
        site.base_scale = nullptr;
        // A captured graph always carries the site update (compared on the device), so it is
        // right whatever ran between capture and replay; outside capture it is skipped while
        // the site is unchanged.
        if (capturing || !mSiteKnown || !sameSite(site, mSiteHost))
        {
            cudaCheck(launchUpdateSite(mSiteDev, site, mOldIds, f.topK, stream), "updating the switch site");
        }
        mSiteKnown = !capturing;
        mSiteHost = site;
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
