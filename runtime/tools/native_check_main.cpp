// adafuse-native-check: opens a native artifact (convert --backend native) with every check the runtime
// makes at open, and prints what its execution needs against what the native kernels cover.
//   adafuse-native-check OUT.native
// Exit 0: it passed and the native kernels cover it; 1: refused (the one-line reason on stderr); 2: usage.
#include <cstdio>
#include <string>

#include "error.h"
#include "native_artifact.h"

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
    std::printf("not covered by the native kernels: %s\n", missing.empty() ? "-" : missing.c_str());
    artifact.require_covered();
  } catch (const adafuse::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
