#include "native_backend.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <tuple>
#include <vector>

#include "error.h"
#include "kernels_api.h"
#include "native_backend_impl.h"
#include "native_mix.h"
#include "route_gather.h"
#include "routing.h"
#include "safetensors.h"

namespace adafuse {
namespace native_detail {
namespace {

constexpr size_t kStagingBytes = size_t{64} << 20;  // pinned host memory the upload streams through

std::string describe_bytes(size_t bytes) {
  char text[64];
  std::snprintf(text, sizeof text, "%.2f GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return std::to_string(bytes) + " bytes (" + text + ")";
}

}  // namespace

NativeBackend::NativeBackend(const NativeArtifact& artifact, const adafuse_open_options& options, const std::string& strategy)
    : a_(artifact), device_(options.device), graphs_enabled_(options.cuda_graphs != 0), switch_(strategy == "switch") {
  dtype_ = a_.dtype == "float32" ? kl::ADAFUSE_FLOAT32 : a_.dtype == "float16" ? kl::ADAFUSE_FLOAT16 : kl::ADAFUSE_BFLOAT16;
  norm_kind_ = a_.norm == "rms" ? kl::ADAFUSE_NORM_RMS : kl::ADAFUSE_NORM_RMS_ONE_PLUS;
  NativeLimits limits;
  limits.max_batch = a_.max_batch;
  limits.max_seq = a_.max_seq;
  limits.switch_strategy = switch_;
  // cuBLASLt for GEMMs of many rows (16-bit dtypes): loaded before the plan, which then holds its buffers.
  std::string lt_missing;
  const std::shared_ptr<const CublasLt> lt_library = native_cublaslt(a_.dtype, &lt_missing);
  limits.cublaslt = lt_library != nullptr;
  plan_ = plan_native(a_, native_tensor_sizes(a_), limits);
  inputs_ = native_input_layout(plan_.dims.tokens, a_.max_batch);
  sites_ = native_sites(a_, plan_.dims);
  for (size_t i = 0; i < sites_.size(); ++i) site_index_[{sites_[i].layer, sites_[i].stage, sites_[i].module}] = i;

  const std::string name = a_.dir.string();
  cuda_check(cudaSetDevice(device_), "CUDA device " + std::to_string(device_) + " (running " + name + " needs an NVIDIA GPU)");
  cuda_check(cudaStreamCreateWithFlags(&stream_.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cuda_check(cudaEventCreate(&step_begin_.event), "cudaEventCreate");
  cuda_check(cudaEventCreate(&step_end_.event), "cudaEventCreate");
  const cudaError_t status = cudaMalloc(&block_.ptr, plan_.total);
  if (status != cudaSuccess) {
    size_t free_bytes = 0, total_bytes = 0;
    cudaGetLastError();
    cudaMemGetInfo(&free_bytes, &total_bytes);
    fail(ADAFUSE_ERR_CUDA, name + ": the native backend needs " + describe_bytes(plan_.total) + " of device memory (weights " +
                               describe_bytes(plan_.group_bytes("weights")) + ", KV cache " +
                               describe_bytes(plan_.group_bytes("kv cache")) + " for " + std::to_string(a_.max_batch) + " x " +
                               std::to_string(a_.max_seq) + " tokens), device " + std::to_string(device_) + " has " +
                               describe_bytes(free_bytes) + " free: " + cudaGetErrorString(status) +
                               " (convert with a smaller --max-batch / --max-seq)");
  }
  base_ = static_cast<char*>(block_.ptr);
  cuda_check(cudaHostAlloc(&host_inputs_.ptr, inputs_.bytes, cudaHostAllocDefault), "pinned host memory for the step inputs");
  upload();
  init_tables();
  if (lt_library) {
    const NativeBuffer& ws = plan_.at("ws.cublaslt");
    lt_ = std::make_unique<LtGemms>(lt_library, base_ + ws.offset, ws.bytes);
  } else if (!lt_missing.empty()) {
    static std::atomic<bool> said{false};  // once per process
    if (!said.exchange(true))
      std::fprintf(stderr, "[adafuse] %s; the native backend's GEMMs of more than %d rows run the kernel library's "
                           "(ADAFUSE_NATIVE_GEMM=kernels chooses them without this note)\n",
                   lt_missing.c_str(), kNativeFewRows);
  }
  info_.max_batch = a_.max_batch;
  info_.max_seq = a_.max_seq;
  info_.vocab = a_.vocab;
  info_.top_k = a_.routing_kind == "pregate" ? static_cast<int32_t>(a_.top_k) : 0;
  info_.layers = static_cast<int32_t>(a_.layers);
  info_.kv_heads = static_cast<int32_t>(a_.kv_heads);
  info_.head_dim = static_cast<int32_t>(a_.head_dim);
  info_.in_flight = true;
  info_.max_step_tokens = static_cast<int32_t>(plan_.dims.tokens);
  info_.description = "native " + strategy + " (" + a_.family + " " + a_.dtype + ", device " + std::to_string(device_) +
                      (lt_ ? ", cuBLASLt above " + std::to_string(kNativeFewRows) + " rows" : "") + ")";
}

NativeBackend::~NativeBackend() {
  cudaSetDevice(device_);
  if (stream_.stream) cudaStreamSynchronize(stream_.stream);
  for (auto& [rows, graph] : graphs_)
    if (graph.exec) cudaGraphExecDestroy(graph.exec);
}

void NativeBackend::set_device() const {
  cuda_check(cudaSetDevice(device_), "cudaSetDevice(" + std::to_string(device_) + ")");
}

// Each tensor streamed from its file through pinned staging to its place in the block: host memory stays
// kStagingBytes whatever the model's size.
void NativeBackend::upload() {
  PinnedMemory staging;
  cuda_check(cudaHostAlloc(&staging.ptr, kStagingBytes, cudaHostAllocDefault), "pinned staging for the weights upload");
  for (const char* file : {kNativeWeights, kNativeAdapters}) {
    const std::filesystem::path path = a_.dir / file;
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) continue;
    const SafetensorsFile st(path, SafetensorsFile::Contents::header_only);
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(ADAFUSE_ERR_FILE, path.string() + ": cannot be opened for reading");
    for (const auto& [name, tensor] : st.tensors()) {
      const NativeBuffer& buffer = plan_.at("w:" + name);
      in.seekg(static_cast<std::streamoff>(tensor.offset));
      for (size_t done = 0; done < buffer.bytes;) {
        const size_t n = std::min(kStagingBytes, buffer.bytes - done);
        if (!in.read(static_cast<char*>(staging.ptr), static_cast<std::streamsize>(n)))
          fail(ADAFUSE_ERR_FILE, path.string() + ": tensor '" + name + "' could not be read (the file changed after its check?)");
        cuda_check(cudaMemcpy(base_ + buffer.offset + done, staging.ptr, n, cudaMemcpyHostToDevice), "upload of '" + name + "'");
        done += n;
      }
    }
  }
}

void NativeBackend::init_tables() {
  for (int64_t l = 0; l < a_.layers; ++l)  // positions past a slot's length are never read; zeros keep it tidy
    for (const char* which : {"key", "value"}) {
      const NativeBuffer& kv = plan_.at("kv." + std::to_string(l) + "." + which);
      cuda_check(cudaMemset(base_ + kv.offset, 0, kv.bytes), "KV cache clear");
    }
  if (a_.routes_file) {
    const RoutingTable table(*a_.routes_file, a_.num_experts);
    const size_t n = table.expert_ids().size() * 4;
    cuda_check(cudaMemcpy(at("routes.table_ids"), table.expert_ids().data(), n, cudaMemcpyHostToDevice), "routing table upload");
    cuda_check(cudaMemcpy(at("routes.table_gates"), table.gates().data(), n, cudaMemcpyHostToDevice), "routing table upload");
  }
  if (plan_.has("routes.ones")) {
    const int64_t rows = plan_.dims.mlp_rows, k = a_.top_k;
    std::vector<float> ones(static_cast<size_t>(rows), 1.0f);
    std::vector<int32_t> expand(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) expand[static_cast<size_t>(i)] = static_cast<int32_t>(i / k);
    cuda_check(cudaMemcpy(at("routes.ones"), ones.data(), ones.size() * 4, cudaMemcpyHostToDevice), "FFN expert gates");
    cuda_check(cudaMemcpy(at("routes.expand"), expand.data(), expand.size() * 4, cudaMemcpyHostToDevice), "FFN expert rows");
  }
  for (const NativeSite& s : sites_) {  // the cuBLASLt sites' B_cat [out, E * rank] from lora_B [E, out, rank]
    if (!plan_.has("lt.b_cat." + s.name)) continue;
    cuda_check(lora_concat_b(static_cast<int>(dtype_), static_cast<int32_t>(s.experts), s.out, static_cast<int32_t>(s.rank),
                             site_lora_b(s), at("lt.b_cat." + s.name), stream_.stream),
               "B_cat of " + s.name);
  }
  if (switch_) {
    // Every adapted site gets a live weight in the model dtype that adafuse_switch re-derives from the pristine
    // uploaded one (W_base): 16-bit, or FP8 with its per-row scales (an FP8 artifact's merged weights are 16-bit:
    // merging the deltas into FP8 would round them away).
    std::vector<kl::adafuse_switch_site> sites;
    for (size_t l = 0; l < a_.stages.size(); ++l)
      for (const NativeStage& st : a_.stages[l]) {
        if (st.adapter != "grouped") continue;
        const std::string p = "layers." + std::to_string(l) + "." + st.name + ".";
        kl::adafuse_switch_site s{};
        s.W = at("switch:" + p + "weight");
        s.W_base = weight(p + "weight");
        s.A = weight(p + "lora_A");
        s.B = weight(p + "lora_B");
        s.out_features = static_cast<int32_t>(st.out_features);
        s.in_features = static_cast<int32_t>(st.in_features);
        s.rank = static_cast<int32_t>(st.rank);
        s.num_experts = static_cast<int32_t>(st.experts);
        s.scale = 1.0f;  // the artifact's B has the scale folded in
        s.base_dtype = a_.fp8_weights ? kl::ADAFUSE_WEIGHT_FP8_E4M3 : kl::ADAFUSE_WEIGHT_AS_DTYPE;
        s.base_scale = a_.fp8_weights ? static_cast<const float*>(weight(p + "weight_scale")) : nullptr;
        kcheck(kl::adafuse_switch_check_site(dtype_, &s), "adafuse_switch_check_site (" + p + "weight)");
        sites.push_back(s);
        switch_max_out_ = std::max(switch_max_out_, s.out_features);
        switch_max_in_ = std::max(switch_max_in_, s.in_features);
      }
    switch_sites_ = static_cast<int32_t>(sites.size());
    cuda_check(cudaMemcpy(at("switch.sites"), sites.data(), sites.size() * sizeof(kl::adafuse_switch_site), cudaMemcpyHostToDevice),
               "switch site table");
    // The live weights start as the bases with no expert merged: a switch to the empty route (ids -1) from a
    // different one (id 0, gate 0; pristine sites use the new route only), which leaves the merged route empty.
    const size_t route_bytes = static_cast<size_t>(a_.top_k) * 4;
    cuda_check(cudaMemsetAsync(at("routes.ids"), 0xff, route_bytes, stream_.stream), "switch routes");
    cuda_check(cudaMemsetAsync(at("routes.gates"), 0, route_bytes, stream_.stream), "switch routes");
    cuda_check(cudaMemsetAsync(at("switch.old_ids"), 0, route_bytes, stream_.stream), "switch routes");
    cuda_check(cudaMemsetAsync(at("switch.old_gates"), 0, route_bytes, stream_.stream), "switch routes");
    switch_now();
  }
  cuda_check(cudaDeviceSynchronize(), "the native backend's upload");
}

[[noreturn]] void NativeBackend::device_failure(const std::string& message) {
  if (!capturing_ && cuda_context_lost()) mark_unusable(message);
  fail(ADAFUSE_ERR_CUDA, message);
}

void NativeBackend::check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) device_failure(what + ": " + cudaGetErrorString(status));
}

void NativeBackend::kcheck(int status, const std::string& what) {
  if (status == kl::ADAFUSE_OK) return;
  const std::string message = what + ": " + kl::adafuse_status_string(status);
  if (status == kl::ADAFUSE_ERR_CUDA) device_failure(message);
  fail(ADAFUSE_ERR_INTERNAL, a_.dir.string() + ": " + message + " (sizes the native backend computed; please report)");
}

}  // namespace native_detail

std::string native_strategy(const NativeArtifact& a, const char* strategy) {
  const std::string chosen = strategy == nullptr ? "fused" : strategy;
  if (chosen != "fused" && chosen != "switch")
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "options.strategy '" + chosen + "' is unknown (expected 'fused' or 'switch')");
  if (chosen == "switch") {
    if (a.routing_kind != "pregate")
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, a.dir.string() + ": strategy 'switch' merges one route per token into every adapted weight, "
                                             "so it needs a pre-gated artifact, found routing " + a.routing_kind +
                                             " (use strategy 'fused')");
    if (a.max_batch != 1)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, a.dir.string() + ": strategy 'switch' merges one sequence's experts into the weights, so it "
                                             "runs batch 1, found runtime.max_batch " + std::to_string(a.max_batch) +
                                             " (convert with --max-batch 1, or use strategy 'fused')");
  }
  return chosen;
}

std::unique_ptr<Backend> open_native_backend(const NativeArtifact& artifact, const adafuse_open_options& options) {
  artifact.require_covered();
  const std::string strategy = native_strategy(artifact, options.strategy);
  return std::make_unique<native_detail::NativeBackend>(artifact, options, strategy);
}

}  // namespace adafuse
