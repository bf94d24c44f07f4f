// adafuse-native-check: opens a native artifact (convert --backend native) with every check the runtime
// makes at open, prints what its execution needs against what the native backend covers, and the device
// memory the native backend would allocate at open (native_plan.h; needs no GPU).
//   adafuse-native-check OUT.native
// Exit 0: it passed and the native backend covers it; 1: refused (the one-line reason on stderr); 2: usage.
#include <cstdio>
#include <string>

#include "cublaslt.h"
#include "error.h"
#include "native_artifact.h"
#include "native_plan.h"

int main(int argc, char** argv) {
  if (argc != 2 || std::string(argv[1]) == "--help") {
    std::fprintf(stderr, "usage: adafuse-native-check OUT.native\n");
    return 2;
  }
  try {
    const adafuse::NativeArtifact artifact = adafuse::NativeArtifact::open(argv[1]);
    std::printf("%s\n", artifact.summary().c_str());
    std::string needs, missing;
    for (const adafuse::NativeFeature& f : artifact.features()) {
      needs += (needs.empty() ? "" : ", ") + f.name;
      if (!f.covered) missing += (missing.empty() ? "" : ", ") + f.name;
    }
    std::printf("needs: %s\n", needs.c_str());
    std::printf("not covered by the native backend: %s\n", missing.empty() ? "-" : missing.c_str());
    artifact.require_covered();
    adafuse::NativeLimits limits;
    limits.max_batch = artifact.max_batch;
    limits.max_seq = artifact.max_seq;
    limits.cublaslt = adafuse::native_cublaslt(artifact.dtype, nullptr) != nullptr;  // as the open decides
    std::printf("%s\n", adafuse::plan_native(artifact, adafuse::native_tensor_sizes(artifact), limits).describe().c_str());
  } catch (const adafuse::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
