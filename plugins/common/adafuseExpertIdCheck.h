// adafuseExpertIdCheck.h - the debug-mode check of the expert_ids input.
//
// The kernels skip an expert id outside [0, num_experts) (it contributes nothing), because
// TensorRT's build-time timing runs enqueue on uninitialised inputs and must not fault.
// At run time such an id is a bug upstream (the pre-gate's TopK / routing table produce
// ids in range by construction), and it must not pass silently where it can be looked for:
// with the check enabled, every enqueue of a plugin attached to an execution context scans
// expert_ids on the device, records the first bad entry in a device status word, and the
// host reads that word back (synchronising the stream: debug only) and fails the enqueue
// with the row, slot and value. Under CUDA-graph capture nothing can be read back: the
// captured check records into the status word, and the next enqueue outside capture
// reports it.
// Enabled by compiling with ADAFUSE_DEBUG_CHECKS (CMake -DADAFUSE_DEBUG_CHECKS=ON) or, in
// any build, by the environment variable ADAFUSE_CHECK_EXPERT_IDS=1 (read once per process).
// The variable is a user-facing debug switch, documented with the plugins, and the one
// environment read of the plugin library: it turns the check on for an engine already built and
// deployed, the way CUDA_LAUNCH_BLOCKING does for launches, without re-exporting and rebuilding
// (a plugin field would be baked into the engine). It changes no result, only adds the check.
#ifndef ADAFUSE_EXPERT_ID_CHECK_H
#define ADAFUSE_EXPERT_ID_CHECK_H

#include <cstdint>
#include <cuda_runtime_api.h>

namespace adafuse
{
namespace plugin
{

class ExpertIdCheck
{
public:
    ExpertIdCheck() = default;
    ~ExpertIdCheck();
    ExpertIdCheck(ExpertIdCheck const&) = delete;
    ExpertIdCheck& operator=(ExpertIdCheck const&) = delete;

    //! ADAFUSE_DEBUG_CHECKS was defined at build time, or ADAFUSE_CHECK_EXPERT_IDS=1.
    static bool enabled() noexcept;

    //! Allocates and clears the status word on the current device (call outside capture).
    void allocate(char const* plugin);
    //! Scans ids [rows, topK] on `stream`. Outside capture: throws PluginError naming the
    //! first out-of-range entry seen since the last report (this call or a graph replay).
    //! Under capture without a status word (never attached to a context): throws.
    void run(char const* plugin, int32_t const* ids, int64_t rows, int32_t topK, int32_t numExperts,
        cudaStream_t stream);

private:
    int32_t* mStatus{nullptr}; // device: [flag, flat index, value]
};

//! True when `stream` is being captured into a CUDA graph (throws PluginError on a CUDA error).
bool streamIsCapturing(cudaStream_t stream, char const* plugin);
//! The device `stream` belongs to: cudaStreamGetDevice, or the current device while the
//! stream is capturing (CUDA refuses the query then). Throws PluginError on a CUDA error.
int streamDevice(cudaStream_t stream, bool capturing, char const* plugin);

} // namespace plugin
} // namespace adafuse

#endif // ADAFUSE_EXPERT_ID_CHECK_H
