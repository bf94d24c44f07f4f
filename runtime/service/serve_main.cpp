// adafuse-serve: the HTTP service over a TensorRT engine or a native artifact.
//   adafuse-serve --engine out.engine|out.native [--host 127.0.0.1] [--port 8000] [--queue 64]
//                 [--tensorrt-lib PATH] [--plugin-lib PATH] [--no-cuda-graphs] [--strategy fused|switch]
//                 [--model-name NAME]
#include <cstdio>
#include <filesystem>

#include "error.h"
#include "http_service.h"
#include "open_backend.h"

int main(int argc, char** argv) {
  adafuse::ServiceOptions service;
  adafuse_open_options open = adafuse_open_options_default();
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--no-cuda-graphs") {
        open.cuda_graphs = 0;
        continue;
      }
      if (arg == "-h" || arg == "--help") {
        std::printf("usage: adafuse-serve --engine OUT.engine|OUT.native [--host H] [--port P] [--queue N] [--tensorrt-lib PATH]\n"
                    "       [--plugin-lib PATH] [--no-cuda-graphs] [--max-connections N] [--idle-timeout-ms MS]\n"
                    "       [--request-timeout-ms MS] [--step-tokens N] [--strategy fused|switch (native artifacts)]\n"
                    "       [--model-name NAME (default: the engine's file name)]\n");
        return 0;
      }
      if (i + 1 >= argc) adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, arg + ": missing value (see --help)");
      const char* value = argv[++i];
      if (arg == "--engine") open.engine_path = value;
      else if (arg == "--tensorrt-lib") open.tensorrt_library = value;
      else if (arg == "--plugin-lib") open.plugin_library = value;
      else if (arg == "--strategy") open.strategy = value;
      else if (!adafuse::parse_service_option(arg, value, service))
        adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "unknown option " + arg + " (see --help)");
    }
    if (open.engine_path == nullptr) adafuse::fail(ADAFUSE_ERR_INVALID_ARGUMENT, "--engine is required");
    if (service.model_name.empty()) {  // out.engine, out.native or out.native/: "out"
      std::filesystem::path path = std::filesystem::path(open.engine_path).lexically_normal();
      if (path.filename().empty()) path = path.parent_path();
      service.model_name = path.stem().string();
    }
    auto backend = adafuse::open_backend(open);
    return adafuse::serve(*backend, service);
  } catch (const adafuse::Error& e) {
    std::fprintf(stderr, "adafuse-serve: %s\n", e.what());
    return e.status() == ADAFUSE_ERR_INVALID_ARGUMENT || e.status() == ADAFUSE_ERR_FILE ? 2 : 1;
  }
}
