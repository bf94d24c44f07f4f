#include "adafuseExpertIdCheck.h"
#include "adafusePluginCommon.h"

#include <algorithm>
#include <cstdlib>

namespace adafuse
{
namespace plugin
{
namespace
{
constexpr int32_t kStatusWords = 3;

__global__ void checkExpertIdsKernel(int32_t const* ids, int64_t n, int32_t numExperts, int32_t* status)
{
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    {
        int32_t const e = ids[i];
        if ((e < 0 || e >= numExperts) && atomicCAS(status, 0, 1) == 0)
        {
            status[1] = static_cast<int32_t>(i < INT32_MAX ? i : INT32_MAX);
            status[2] = e;
        }
    }
}

void cudaCheck(cudaError_t e, char const* plugin, char const* what)
{
    if (e != cudaSuccess)
    {
        (void) cudaGetLastError(); // consumed: reported here, not again by a later launch check
        throw PluginError(str(plugin, ": ", what, " failed: ", cudaGetErrorString(e)));
    }
}
} // namespace

bool streamIsCapturing(cudaStream_t stream, char const* plugin)
{
    cudaStreamCaptureStatus s = cudaStreamCaptureStatusNone;
    cudaCheck(cudaStreamIsCapturing(stream, &s), plugin, "cudaStreamIsCapturing");
    return s != cudaStreamCaptureStatusNone;
}

int streamDevice(cudaStream_t stream, bool capturing, char const* plugin)
{
    // cudaStreamGetDevice is refused on a capturing stream (and invalidates the capture), so
    // under capture: the current device, which a captured launch has to target anyway.
    int dev = -1;
    if (capturing)
        cudaCheck(cudaGetDevice(&dev), plugin, "cudaGetDevice");
    else
        cudaCheck(cudaStreamGetDevice(stream, &dev), plugin, "cudaStreamGetDevice");
    return dev;
}

bool ExpertIdCheck::enabled() noexcept
{
#ifdef ADAFUSE_DEBUG_CHECKS
    return true;
#else
    static bool const kEnabled = [] {
        char const* v = std::getenv("ADAFUSE_CHECK_EXPERT_IDS");
        return v != nullptr && v[0] != '\0' && v[0] != '0';
    }();
    return kEnabled;
#endif
}

ExpertIdCheck::~ExpertIdCheck()
{
    if (mStatus != nullptr)
        cudaFree(mStatus); // nothing useful can be done with an error in a destructor
}

void ExpertIdCheck::allocate(char const* plugin)
{
    if (mStatus != nullptr)
        return;
    cudaCheck(cudaMalloc(reinterpret_cast<void**>(&mStatus), sizeof(int32_t) * kStatusWords), plugin,
        "cudaMalloc(expert id status)");
    cudaCheck(cudaMemset(mStatus, 0, sizeof(int32_t) * kStatusWords), plugin, "cudaMemset(expert id status)");
    cudaCheck(cudaStreamSynchronize(cudaStreamLegacy), plugin, "clearing the expert id status");
}

void ExpertIdCheck::run(char const* plugin, int32_t const* ids, int64_t rows, int32_t topK, int32_t numExperts,
    cudaStream_t stream)
{
    bool const capturing = streamIsCapturing(stream, plugin);
    check(mStatus != nullptr || !capturing, plugin,
        "the expert_ids check (ADAFUSE_CHECK_EXPERT_IDS / ADAFUSE_DEBUG_CHECKS) has no status word and enqueue is "
        "being captured into a CUDA graph; attach the plugin to an execution context before capturing");
    allocate(plugin);
    int64_t const n = rows * topK;
    if (n > 0)
    {
        int const blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 1024));
        checkExpertIdsKernel<<<blocks, 256, 0, stream>>>(ids, n, numExperts, mStatus);
        cudaCheck(cudaGetLastError(), plugin, "launching the expert_ids check");
    }
    if (capturing)
        return; // recorded on replay; reported by the next enqueue outside capture
    int32_t host[kStatusWords] = {0, 0, 0};
    cudaCheck(cudaMemcpyAsync(host, mStatus, sizeof(host), cudaMemcpyDeviceToHost, stream), plugin,
        "reading the expert id status");
    cudaCheck(cudaStreamSynchronize(stream), plugin, "reading the expert id status");
    if (host[0] != 0)
    {
        cudaCheck(cudaMemsetAsync(mStatus, 0, sizeof(host), stream), plugin, "clearing the expert id status");
        throw PluginError(str(plugin, ": input 4 (expert_ids) holds ", host[2], " at flat index ", host[1],
            " (row ", host[1] / topK, ", slot ", host[1] % topK, "), outside [0, num_experts=", numExperts, ")",
            " (this enqueue or a CUDA graph replay since the last check); such an expert would contribute nothing [ADAFUSE_CHECK_EXPERT_IDS]"));
    }
}

} // namespace plugin
} // namespace adafuse
