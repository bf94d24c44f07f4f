// The native backend: a native artifact (convert --backend native) run on one GPU with the project's own
// kernels (plugins/kernels, linked in): every family feature the artifact lists, prefill and decode through
// one step (rows of slot, start, count: in-flight batching), decode steps replayed from CUDA graphs, the
// fused (adafuse_lora_linear) and switch (adafuse_switch, batch 1) strategies. Device memory is planned
// (native_plan.h) and allocated once at open.
#pragma once

#include <memory>
#include <string>

#include "adafuse/runtime.h"
#include "backend.h"
#include "native_artifact.h"

namespace adafuse {

// The strategy named by options.strategy (NULL: "fused"), refused with one line when unknown or when the
// artifact cannot run it ("switch": a pre-gated artifact and max_batch 1). Needs no GPU.
std::string native_strategy(const NativeArtifact& artifact, const char* strategy);

// Checks the features (require_covered) and the strategy, plans the device memory, then sets the device,
// allocates and uploads. Every failure is one line (a GPU-less machine: the CUDA error, after every check).
std::unique_ptr<Backend> open_native_backend(const NativeArtifact& artifact, const adafuse_open_options& options);

}  // namespace adafuse
