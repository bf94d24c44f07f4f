#include "tensorrt_backend.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include "engine_layout.h"
#include "error.h"
#include "files.h"
#include "graph_cache.h"
#include "route_gather.h"
#include "routing.h"
#include "tensorrt_library.h"

namespace adafuse {
namespace {

constexpr int kPrefill = 0, kDecode = 1;  // optimisation profiles (adafuse_export/trt/build.py)
constexpr size_t kMaxGraphs = 4096;       // captured decode steps kept (one per batch, past length, buffer), LRU

// The plugin library installed with this code: beside the module that holds it (the shared runtime in
// lib/), or in ../lib of it (adafuse-serve in bin/). Both the wheel (adafuse_export/_native/{bin,lib}) and
// `cmake --install` use that layout. Empty when neither exists.
std::string installed_plugin_library() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&installed_plugin_library), &info) == 0 || info.dli_fname == nullptr)
    return "";
  const std::filesystem::path here = std::filesystem::path(info.dli_fname).parent_path();
  for (const auto& candidate : {here / "libadafuse_trt_plugins.so", here / ".." / "lib" / "libadafuse_trt_plugins.so"}) {
    std::error_code ec;
    if (std::filesystem::is_regular_file(candidate, ec)) return candidate.lexically_normal().string();
  }
  return "";
}

void cuda_check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) fail(ADAFUSE_ERR_CUDA, what + ": " + cudaGetErrorString(status));
}

// After a failure: whether the CUDA context is lost (a sticky error such as an illegal address, which
// every later call returns again until the process ends). A non-sticky error (out of memory, a bad
// argument) is cleared by cudaGetLastError and the device still synchronizes.
bool cuda_context_lost() {
  cudaGetLastError();
  return cudaDeviceSynchronize() != cudaSuccess;
}

// The stream of one backend, destroyed with it, also when its constructor throws after creating it.
class CudaStream {
 public:
  CudaStream() = default;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream() {
    if (stream_) cudaStreamDestroy(stream_);
  }
  void create() { cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"); }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
  }
};

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  void* ensure(size_t bytes, const std::string& what) {
    if (bytes > size_) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = nullptr;
      size_ = 0;
      cuda_check(cudaMalloc(&ptr_, bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes for " + what);
      size_ = bytes;
    }
    return ptr_;
  }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

template <typename T>
struct TrtDelete {
  void operator()(T* p) const { delete p; }
};
template <typename T>
using TrtPtr = std::unique_ptr<T, TrtDelete<T>>;

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: value = mant * 2^-24
      float f = static_cast<float>(mant) * 0x1.0p-24f;
      return (h & 0x8000u) ? -f : f;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

class TensorRTBackend final : public Backend {
 public:
  TensorRTBackend(const Manifest& manifest, const adafuse_open_options& options);
  const BackendInfo& info() const override { return info_; }

 protected:
  void do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits, int32_t* expert_ids,
                  float* gates) override;
  void do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) override;
  void do_read_kv(int32_t layer, bool value, float* out) const override;

 private:
  // Uploads ids and positions, looks routes up on the device, binds every tensor of one step.
  void bind(int profile, const int64_t* ids, int32_t batch, int32_t len, int32_t past, void* logits);
  void enqueue(int profile);
  void copy_routes_back(int32_t* expert_ids, float* gates, size_t n);
  void* kv(int slot, int32_t layer, bool value) const;
  using Graphs = GraphCache<cudaGraphExec_t>;
  // Captures the decode step just run (same shapes and addresses) into graph.
  void capture(Graphs::Entry& graph);
  // cuda_check for the steps: a failure that loses the CUDA context also marks the backend unusable.
  void step_check(cudaError_t status, const std::string& what);
  // Loads the plugin library into TensorRT's process-wide registry unless it is there already.
  void register_plugins(const std::string& plugin_path);

  TensorRTLibrary trt_;  // first member: unloaded after every TensorRT object below
  Logger logger_;
  CudaStream stream_;  // before the contexts and graphs that use it, so destroyed after them
  EngineLayout layout_;
  BackendInfo info_;
  std::string engine_name_;
  TrtPtr<nvinfer1::IRuntime> runtime_;
  TrtPtr<nvinfer1::ICudaEngine> engine_;
  TrtPtr<nvinfer1::IExecutionContext> contexts_[2];
  DeviceBuffer ids_, positions_, route_ids_, route_gates_, table_ids_, table_gates_, prefill_logits_, step_logits_;
  DeviceBuffer cache_[2];  // ping-pong: the past lives in cache_[slot_], the present is written to the other
  int slot_ = 0;
  size_t kv_bytes_per_tensor_ = 0;
  std::vector<int64_t> host_ids_, host_positions_;
  bool cuda_graphs_ = true;
  Graphs graphs_{kMaxGraphs, [](cudaGraphExec_t exec) { cudaGraphExecDestroy(exec); }};  // last: destroyed first
};

TensorRTBackend::TensorRTBackend(const Manifest& manifest, const adafuse_open_options& options)
    : layout_(engine_layout(manifest)), engine_name_(manifest.engine_path.string()) {
  if (manifest.backend != "tensorrt")
    fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": built with " + manifest.backend + " " + manifest.backend_version +
                                   "; this runtime runs full TensorRT engines (convert with --backend tensorrt)");
  std::string plugin_path;
  if (manifest.plugin) {
    const char* env = std::getenv("ADAFUSE_PLUGIN_LIB");
    plugin_path = options.plugin_library ? options.plugin_library : (env ? env : installed_plugin_library());
    if (plugin_path.empty())
      fail(ADAFUSE_ERR_PLUGIN, engine_name_ + ": this engine uses the " + manifest.plugin->library +
                                   " plugin library, which is not installed beside the runtime; set ADAFUSE_PLUGIN_LIB to "
                                   "its path (or pass plugin_library)");
    check_plugin_library(plugin_path, engine_name_);
  }
  trt_ = open_tensorrt(options.tensorrt_library ? options.tensorrt_library : "");
  check_engine_tensorrt_version(engine_name_, manifest.backend_version, trt_);
  cuda_check(cudaSetDevice(options.device), "CUDA device " + std::to_string(options.device) + " (running " + engine_name_ +
                                                " needs an NVIDIA GPU)");
  stream_.create();
  cuda_graphs_ = options.cuda_graphs != 0;

  runtime_.reset(static_cast<nvinfer1::IRuntime*>(
      reinterpret_cast<void* (*)(void*, int32_t)>(trt_.library.symbol("createInferRuntime_INTERNAL"))(&logger_,
                                                                                                    NV_TENSORRT_VERSION)));
  if (!runtime_) fail(ADAFUSE_ERR_TENSORRT, trt_.library.path() + ": TensorRT " + trt_.version_text + " could not create a runtime");
  if (!plugin_path.empty()) register_plugins(plugin_path);
  // A regular file (hashed above), read to its fstat size; 1 TiB is far above any engine.
  const std::string blob = read_bytes(manifest.engine_path, "engine file", 1ull << 40);
  engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
  if (!engine_)
    fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": TensorRT " + trt_.version_text + " could not deserialize the engine (built with " +
                                   manifest.backend + " " + manifest.backend_version + ")");
  if (engine_->getNbOptimizationProfiles() != 2)
    fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": the engine has " + std::to_string(engine_->getNbOptimizationProfiles()) +
                                   " optimisation profiles, expected 2 (0 prefill, 1 decode)");
  for (int p : {kPrefill, kDecode}) {
    contexts_[p].reset(engine_->createExecutionContext());
    if (!contexts_[p]) fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": could not create an execution context");
    if (!contexts_[p]->setOptimizationProfileAsync(p, stream_.get()))
      fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": could not select optimisation profile " + std::to_string(p));
  }
  const size_t b = static_cast<size_t>(layout_.max_batch), s = static_cast<size_t>(layout_.max_seq);
  kv_bytes_per_tensor_ = b * static_cast<size_t>(layout_.kv_heads) * s * static_cast<size_t>(layout_.head_dim) *
                         dtype_bytes(layout_.kv_dtype);
  for (auto& c : cache_) c.ensure(kv_bytes_per_tensor_ * 2 * static_cast<size_t>(layout_.layers), "the KV cache");
  ids_.ensure(b * s * sizeof(int64_t), "input ids");
  positions_.ensure(b * s * sizeof(int64_t), "position ids");
  step_logits_.ensure(b * static_cast<size_t>(layout_.vocab) * sizeof(float), "decode logits");
  if (layout_.top_k > 0) {
    route_ids_.ensure(b * s * static_cast<size_t>(layout_.top_k) * 4, "routes");
    route_gates_.ensure(b * s * static_cast<size_t>(layout_.top_k) * 4, "routes");
  }
  if (layout_.routes_in) {
    RoutingTable table(*manifest.routes_file, manifest.num_experts);
    if (table.top_k() != layout_.top_k || table.vocab() != layout_.vocab)
      fail(ADAFUSE_ERR_FILE, manifest.routes_file->string() + ": routing table [" + std::to_string(table.vocab()) + ", " +
                                 std::to_string(table.top_k()) + "], the engine takes top-k " + std::to_string(layout_.top_k) +
                                 " over a vocabulary of " + std::to_string(layout_.vocab));
    const size_t n = table.expert_ids().size();
    cuda_check(cudaMemcpy(table_ids_.ensure(n * 4, "routing table"), table.expert_ids().data(), n * 4, cudaMemcpyHostToDevice),
               "routing table upload");
    cuda_check(cudaMemcpy(table_gates_.ensure(n * 4, "routing table"), table.gates().data(), n * 4, cudaMemcpyHostToDevice),
               "routing table upload");
  }
  info_ = BackendInfo{layout_.max_batch, layout_.max_seq, layout_.vocab, layout_.top_k, layout_.layers,
                      layout_.kv_heads, layout_.head_dim,
                      "TensorRT " + trt_.version_text + " (" + trt_.library.path() + "), " + manifest.dtype};
}

void TensorRTBackend::register_plugins(const std::string& plugin_path) {
  // The registry lives in libnvinfer: pinned for the process (RTLD_NODELETE), so a registration
  // recorded here cannot outlive it when the last engine closes and the library is opened again.
  dlerror();
  if (dlopen(trt_.library.path().c_str(), RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE) == nullptr) {
    const char* why = dlerror();
    fail(ADAFUSE_ERR_TENSORRT, trt_.library.path() + ": could not keep TensorRT loaded for its plugin registry: " +
                                   (why ? why : "dlopen failed"));
  }
  using RegistryFn = nvinfer1::IPluginRegistry* (*)();
  auto global_registry = reinterpret_cast<RegistryFn>(trt_.library.symbol("getPluginRegistry"));
  nvinfer1::IPluginRegistry* registry = global_registry ? global_registry() : nullptr;
  if (registry == nullptr)
    fail(ADAFUSE_ERR_TENSORRT, trt_.library.path() + ": TensorRT " + trt_.version_text + " has no plugin registry (getPluginRegistry)");
  // Each runtime's local registry searches this one, its parent, for the engine's plugins.
  process_plugin_registrations().register_once(registry, plugin_path, [&] {
    if (registry->loadLibrary(plugin_path.c_str()) == nullptr)
      fail(ADAFUSE_ERR_PLUGIN, plugin_path + ": TensorRT could not load the plugin library (see the TensorRT log above)");
  });
}

void TensorRTBackend::step_check(cudaError_t status, const std::string& what) {
  if (status == cudaSuccess) return;
  const std::string message = what + ": " + cudaGetErrorString(status);
  if (cuda_context_lost()) mark_unusable(message);
  fail(ADAFUSE_ERR_CUDA, message);
}

void* TensorRTBackend::kv(int slot, int32_t layer, bool value) const {
  return static_cast<char*>(cache_[slot].get()) + (static_cast<size_t>(layer) * 2 + (value ? 1 : 0)) * kv_bytes_per_tensor_;
}

void TensorRTBackend::bind(int profile, const int64_t* ids, int32_t batch, int32_t len, int32_t past, void* logits) {
  const size_t n = static_cast<size_t>(batch) * static_cast<size_t>(len);
  host_ids_.assign(ids, ids + n);
  host_positions_.resize(n);
  for (size_t i = 0; i < n; ++i) host_positions_[i] = past + static_cast<int64_t>(i % static_cast<size_t>(len));
  step_check(cudaMemcpyAsync(ids_.get(), host_ids_.data(), n * 8, cudaMemcpyHostToDevice, stream_.get()), "input ids upload");
  step_check(cudaMemcpyAsync(positions_.get(), host_positions_.data(), n * 8, cudaMemcpyHostToDevice, stream_.get()),
             "position ids upload");
  nvinfer1::IExecutionContext& ctx = *contexts_[profile];
  auto set = [&](const std::string& name, std::initializer_list<int64_t> shape, void* address) {
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(shape.size());
    int i = 0;
    for (int64_t d : shape) dims.d[i++] = d;
    if (!ctx.setInputShape(name.c_str(), dims) || !ctx.setTensorAddress(name.c_str(), address))
      fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": TensorRT refused the shape or address of '" + name + "' (see its log)");
  };
  auto out = [&](const std::string& name, void* address) {
    if (!ctx.setTensorAddress(name.c_str(), address))
      fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": TensorRT refused the address of '" + name + "'");
  };
  set("input_ids", {batch, len}, ids_.get());
  set("position_ids", {batch, len}, positions_.get());
  if (layout_.routes_in) {
    step_check(gather_routes(static_cast<const int64_t*>(ids_.get()), static_cast<int64_t>(n), layout_.top_k,
                             static_cast<const int32_t*>(table_ids_.get()), static_cast<const float*>(table_gates_.get()),
                             static_cast<int32_t*>(route_ids_.get()), static_cast<float*>(route_gates_.get()), stream_.get()),
               "routing table lookup");
    set("expert_ids", {batch, len, layout_.top_k}, route_ids_.get());
    set("gates", {batch, len, layout_.top_k}, route_gates_.get());
  }
  for (int32_t l = 0; l < layout_.layers; ++l)
    for (bool value : {false, true}) {
      const std::string suffix = std::to_string(l) + (value ? ".value" : ".key");
      set("past_key_values." + suffix, {batch, layout_.kv_heads, past, layout_.head_dim}, kv(slot_, l, value));
      out("present." + suffix, kv(1 - slot_, l, value));
    }
  if (layout_.routes_out) {  // the pre-gate runs inside the decoder: keep what it chose
    out("expert_ids", route_ids_.get());
    out("gates", route_gates_.get());
  }
  out("logits", logits);
}

void TensorRTBackend::enqueue(int profile) {
  if (!contexts_[profile]->enqueueV3(stream_.get())) {
    const std::string message = engine_name_ + ": TensorRT execution failed (see the TensorRT log above)";
    if (cuda_context_lost()) mark_unusable(message);
    fail(ADAFUSE_ERR_TENSORRT, message);
  }
}

void TensorRTBackend::copy_routes_back(int32_t* expert_ids, float* gates, size_t n) {
  const size_t bytes = n * static_cast<size_t>(layout_.top_k) * 4;
  if (expert_ids && layout_.top_k > 0)
    step_check(cudaMemcpyAsync(expert_ids, route_ids_.get(), bytes, cudaMemcpyDeviceToHost, stream_.get()), "routes download");
  if (gates && layout_.top_k > 0)
    step_check(cudaMemcpyAsync(gates, route_gates_.get(), bytes, cudaMemcpyDeviceToHost, stream_.get()), "routes download");
}

void TensorRTBackend::do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits,
                                 int32_t* expert_ids, float* gates) {
  const size_t row = static_cast<size_t>(layout_.vocab) * sizeof(float);
  void* device_logits = prefill_logits_.ensure(static_cast<size_t>(batch) * static_cast<size_t>(len) * row, "prefill logits");
  slot_ = 0;
  bind(kPrefill, ids, batch, len, 0, device_logits);
  enqueue(kPrefill);
  if (all_positions)
    step_check(cudaMemcpyAsync(logits, device_logits, static_cast<size_t>(batch) * static_cast<size_t>(len) * row,
                               cudaMemcpyDeviceToHost, stream_.get()), "logits download");
  else  // the last position of each sequence
    step_check(cudaMemcpy2DAsync(logits, row, static_cast<char*>(device_logits) + (static_cast<size_t>(len) - 1) * row,
                                 static_cast<size_t>(len) * row, row, static_cast<size_t>(batch), cudaMemcpyDeviceToHost, stream_.get()),
               "logits download");
  copy_routes_back(expert_ids, gates, static_cast<size_t>(batch) * static_cast<size_t>(len));
  step_check(cudaStreamSynchronize(stream_.get()), "prefill");
  slot_ = 1;
}

void TensorRTBackend::do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) {
  const int32_t past = past_length();
  bind(kDecode, ids, batch, 1, past, step_logits_.get());
  // A captured step replays only with the same shapes and addresses (graph_cache.h). The first sight
  // runs plainly, the second also captures, later ones replay.
  Graphs::Entry* graph = cuda_graphs_ ? &graphs_.touch({batch, past, slot_}) : nullptr;
  if (graph != nullptr && graph->exec != nullptr) {
    step_check(cudaGraphLaunch(graph->exec, stream_.get()), "CUDA graph launch");
  } else {
    enqueue(kDecode);
    if (graph != nullptr && ++graph->seen >= 2) capture(*graph);
  }
  step_check(cudaMemcpyAsync(logits, step_logits_.get(), static_cast<size_t>(batch) * static_cast<size_t>(layout_.vocab) * 4,
                             cudaMemcpyDeviceToHost, stream_.get()), "logits download");
  copy_routes_back(expert_ids, gates, static_cast<size_t>(batch));
  step_check(cudaStreamSynchronize(stream_.get()), "decode step");
  slot_ = 1 - slot_;
}

void TensorRTBackend::capture(Graphs::Entry& graph) {
  cudaGraph_t captured = nullptr;
  bool ok = cudaStreamBeginCapture(stream_.get(), cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  ok = contexts_[kDecode]->enqueueV3(stream_.get()) && ok;
  ok = cudaStreamEndCapture(stream_.get(), &captured) == cudaSuccess && ok && captured != nullptr;
  ok = ok && cudaGraphInstantiate(&graph.exec, captured, 0) == cudaSuccess;
  if (captured) cudaGraphDestroy(captured);
  if (!ok) {  // the engine does not allow capture (e.g. a plugin without capture support): stay eager
    graph.exec = nullptr;
    cuda_graphs_ = false;
    cudaGetLastError();
    std::fprintf(stderr, "[adafuse] %s: decode steps cannot be captured in CUDA graphs; running them eagerly\n",
                 engine_name_.c_str());
  }
}

void TensorRTBackend::do_read_kv(int32_t layer, bool value, float* out) const {
  const size_t n = static_cast<size_t>(batch()) * static_cast<size_t>(layout_.kv_heads) * static_cast<size_t>(past_length()) *
                   static_cast<size_t>(layout_.head_dim);
  const size_t elt = dtype_bytes(layout_.kv_dtype);
  std::vector<uint16_t> raw(layout_.kv_dtype == "float" ? 0 : n);
  void* dst = layout_.kv_dtype == "float" ? static_cast<void*>(out) : static_cast<void*>(raw.data());
  cuda_check(cudaMemcpy(dst, kv(slot_, layer, value), n * elt, cudaMemcpyDeviceToHost), "KV cache download");
  if (layout_.kv_dtype == "half")
    for (size_t i = 0; i < n; ++i) out[i] = half_to_float(raw[i]);
  if (layout_.kv_dtype == "bf16")
    for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(raw[i]);
}

}  // namespace

std::unique_ptr<Backend> open_tensorrt_backend(const Manifest& manifest, const adafuse_open_options& options) {
  return std::make_unique<TensorRTBackend>(manifest, options);
}

}  // namespace adafuse
