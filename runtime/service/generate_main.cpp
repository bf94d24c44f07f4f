// adafuse-generate: generate from an engine through the C API, print the ids and ms/token.
//   adafuse-generate --engine out.engine --prompt-ids 1,2,3 --max-new-tokens 32
//                    [--temperature T --top-k K --top-p P --seed S --stop-ids 2,7]
//                    [--tensorrt-lib PATH] [--plugin-lib PATH] [--no-cuda-graphs]
// Errors print one line and exit 2 (bad input) or 1 (the engine or the GPU failed).
#include <adafuse/runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "adafuse-generate: %s\n", message.c_str());
  std::exit(2);
}

std::vector<int64_t> parse_ids(const std::string& option, const std::string& text) {
  std::vector<int64_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = text.find(',', start);
    const std::string item = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    char* rest = nullptr;
    const long long v = std::strtoll(item.c_str(), &rest, 10);
    if (item.empty() || *rest != '\0' || v < 0)
      usage_error(option + ": expected comma-separated non-negative token ids, found '" + text + "'");
    ids.push_back(v);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return ids;
}

double parse_number(const std::string& option, const char* text) {
  char* rest = nullptr;
  const double v = std::strtod(text, &rest);
  if (*text == '\0' || *rest != '\0') usage_error(option + ": expected a number, found '" + text + "'");
  return v;
}

int stream_token(void*, int32_t, int64_t token) {
  std::printf("%lld ", static_cast<long long>(token));
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  adafuse_open_options open = adafuse_open_options_default();
  adafuse_generate_options gen = adafuse_generate_options_default();
  std::vector<int64_t> prompt, stop;
  gen.max_new_tokens = 32;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--no-cuda-graphs") {
      open.cuda_graphs = 0;
      continue;
    }
    if (arg == "-h" || arg == "--help") {
      std::printf("usage: adafuse-generate --engine OUT.engine|OUT.native --prompt-ids 1,2,3 [--max-new-tokens N] [--temperature T]\n"
                  "       [--top-k K] [--top-p P] [--seed S] [--stop-ids A,B] [--tensorrt-lib PATH] [--plugin-lib PATH]\n"
                  "       [--no-cuda-graphs] [--strategy fused|switch (native artifacts)]\n");
      return 0;
    }
    if (i + 1 >= argc) usage_error(arg + ": missing value (see --help)");
    const char* value = argv[++i];
    if (arg == "--engine") open.engine_path = value;
    else if (arg == "--prompt-ids") prompt = parse_ids(arg, value);
    else if (arg == "--stop-ids") stop = parse_ids(arg, value);
    else if (arg == "--max-new-tokens") gen.max_new_tokens = static_cast<int32_t>(parse_number(arg, value));
    else if (arg == "--temperature") gen.sampling.temperature = static_cast<float>(parse_number(arg, value));
    else if (arg == "--top-k") gen.sampling.top_k = static_cast<int32_t>(parse_number(arg, value));
    else if (arg == "--top-p") gen.sampling.top_p = static_cast<float>(parse_number(arg, value));
    else if (arg == "--seed") gen.sampling.seed = static_cast<uint64_t>(parse_number(arg, value));
    else if (arg == "--tensorrt-lib") open.tensorrt_library = value;
    else if (arg == "--plugin-lib") open.plugin_library = value;
    else if (arg == "--strategy") open.strategy = value;
    else usage_error("unknown option " + arg + " (see --help)");
  }
  if (open.engine_path == nullptr) usage_error("--engine is required");
  if (prompt.empty()) usage_error("--prompt-ids is required");
  adafuse_engine* engine = nullptr;
  adafuse_status status = adafuse_engine_open(&open, &engine);
  if (status != ADAFUSE_OK) {
    std::fprintf(stderr, "adafuse-generate: %s\n", adafuse_last_error());
    return status == ADAFUSE_ERR_INVALID_ARGUMENT || status == ADAFUSE_ERR_FILE ? 2 : 1;
  }
  gen.stop_ids = stop.data();
  gen.num_stop_ids = stop.size();
  gen.on_token = stream_token;
  std::vector<int64_t> tokens(static_cast<size_t>(gen.max_new_tokens > 0 ? gen.max_new_tokens : 0));
  int32_t length = 0;
  const auto start = std::chrono::steady_clock::now();
  status = adafuse_generate(engine, prompt.data(), 1, static_cast<int32_t>(prompt.size()), &gen, tokens.data(), &length);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf("\n");
  if (status != ADAFUSE_OK) {
    std::fprintf(stderr, "adafuse-generate: %s\n", adafuse_last_error());
    adafuse_engine_free(engine);
    return status == ADAFUSE_ERR_INVALID_ARGUMENT ? 2 : 1;
  }
  std::fprintf(stderr, "%d tokens in %.1f ms: %.2f ms/token (prefill of %zu tokens included)\n", length, ms,
               length > 0 ? ms / length : 0.0, prompt.size());
  adafuse_engine_free(engine);
  return 0;
}
