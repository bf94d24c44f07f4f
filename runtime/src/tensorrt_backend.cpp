#include "tensorrt_backend.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <vector>

#include "decoder_contract.h"
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
constexpr size_t kMaxGraphs = 256;        // captured decode steps kept (one per batch and cache buffer), LRU

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
  void do_step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids,
               float* gates) override;
  void do_read_kv(int32_t layer, bool value, float* out) const override;

 private:
  // One engine call for in-flight rows (plan_step): prefill, decode and step all run through it.
  void run(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids, float* gates);
  // Uploads the step's ids and lengths, looks routes up on the device, binds every tensor (step_bindings).
  void bind(const EngineStep& step, void* logits);
  void enqueue(int profile);
  // Slots at and above the engine's batch that hold tokens: the present buffer gets their cache too (copy engines).
  void carry_rows(int32_t from);
  // An in-place engine's own tensors: each present.{l} of its past's shape and dtype, the cache axis max_seq.
  void check_in_place_tensors() const;
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
  DeviceBuffer ids_, lengths_, route_ids_, route_gates_, table_ids_, table_gates_, prefill_logits_, step_logits_;
  // Copy engines ping-pong: the past lives in cache_[slot_], the present is written to the other. In-place engines
  // (layout_.kv_in_place) hold cache_[0] only, present bound to the past's memory; slot_ stays 0. Each layer's keys
  // (and values) are [max_batch, kv_heads, max_seq, head_dim]: one row per slot, bound whole (a prefix of rows).
  DeviceBuffer cache_[2];
  int slot_ = 0;
  size_t kv_bytes_per_tensor_ = 0, kv_bytes_per_row_ = 0;
  std::vector<int64_t> host_lengths_;  // past_lengths then seq_lens, one upload
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
  // A version-compatible engine runs on TensorRT's lean runtime (libnvinfer_lean), found as libnvinfer is. Its
  // plan leaves the lean runtime out (kEXCLUDE_LEAN_RUNTIME) and packs no plugin code, so it holds no host code:
  // IRuntime::setEngineHostCodeAllowed stays false (TensorRT's version-compatibility guide asks for it only for
  // plans that embed the lean runtime or plugins).
  trt_ = open_tensorrt(options.tensorrt_library ? options.tensorrt_library : "",
                       manifest.version_compatible ? TensorRTRuntime::lean : TensorRTRuntime::full);
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
    fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": TensorRT " + trt_.version_text +
                                   (manifest.version_compatible ? "'s lean runtime" : "") +
                                   " could not deserialize the engine (built with " + manifest.backend + " " +
                                   manifest.backend_version + (manifest.version_compatible ? ", version-compatible" : "") +
                                   "; see the TensorRT log above)");
  if (engine_->getNbOptimizationProfiles() != 2)
    fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": the engine has " + std::to_string(engine_->getNbOptimizationProfiles()) +
                                   " optimisation profiles, expected 2 (0 prefill, 1 decode)");
  for (int p : {kPrefill, kDecode}) {
    contexts_[p].reset(engine_->createExecutionContext());
    if (!contexts_[p]) fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": could not create an execution context");
    if (!contexts_[p]->setOptimizationProfileAsync(p, stream_.get()))
      fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": could not select optimisation profile " + std::to_string(p));
  }
  // The profiles must take the whole cache (max_seq positions) and every batch up to max_batch.
  for (int p : {kPrefill, kDecode}) {
    const std::string k0 = std::string(decoder_contract::kPastPrefix) + "0.key";
    const nvinfer1::Dims lo = engine_->getProfileShape(k0.c_str(), p, nvinfer1::OptProfileSelector::kMIN);
    const nvinfer1::Dims hi = engine_->getProfileShape(k0.c_str(), p, nvinfer1::OptProfileSelector::kMAX);
    if (lo.nbDims != 4 || hi.nbDims != 4 || lo.d[2] > layout_.max_seq || hi.d[2] < layout_.max_seq || lo.d[0] > 1 ||
        hi.d[0] < layout_.max_batch)
      fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": optimisation profile " + std::to_string(p) + " of '" + k0 +
                                     "' does not take the whole cache (batch 1.." + std::to_string(layout_.max_batch) +
                                     ", " + std::to_string(layout_.max_seq) + " positions); convert the model again");
  }
  if (layout_.kv_in_place) check_in_place_tensors();
  const size_t b = static_cast<size_t>(layout_.max_batch), s = static_cast<size_t>(layout_.max_seq);
  kv_bytes_per_tensor_ = b * static_cast<size_t>(layout_.kv_heads) * s * static_cast<size_t>(layout_.head_dim) *
                         dtype_bytes(layout_.kv_dtype);
  kv_bytes_per_row_ = kv_bytes_per_tensor_ / b;
  for (int32_t c = 0; c < layout_.cache_buffers(); ++c) {
    const size_t bytes = kv_bytes_per_tensor_ * 2 * static_cast<size_t>(layout_.layers);
    // zeros: the contract wants finite values beyond every row's length (masked entries still meet 0 * x)
    cuda_check(cudaMemset(cache_[c].ensure(bytes, "the KV cache"), 0, bytes), "KV cache initialisation");
  }
  ids_.ensure(b * s * sizeof(int64_t), "input ids");
  lengths_.ensure(2 * b * sizeof(int64_t), "past lengths and sequence lengths");
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
  info_.in_flight = true;  // rows carry their own lengths (decoder_contract.h)
  // A step's tokens over all rows: a whole prompt of max_seq, or one token for every slot.
  info_.max_step_tokens = std::max(layout_.max_batch, layout_.max_seq);
}

void TensorRTBackend::check_in_place_tensors() const {
  namespace dc = decoder_contract;
  for (const TensorBinding& t : step_bindings(layout_, 1, 1)) {
    if (t.layer < 0 || t.input) continue;
    const std::string past = dc::kPastPrefix + t.name.substr(std::strlen(dc::kPresentPrefix));
    const nvinfer1::Dims in = engine_->getTensorShape(past.c_str()), out = engine_->getTensorShape(t.name.c_str());
    bool same = in.nbDims == 4 && out.nbDims == 4 && in.d[2] == layout_.max_seq &&
                engine_->getTensorDataType(past.c_str()) == engine_->getTensorDataType(t.name.c_str());
    for (int32_t i = 0; same && i < 4; ++i) same = in.d[i] == out.d[i];
    if (!same)
      fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": the engine's output '" + t.name + "' and input '" + past +
                                     "' are not one dtype and shape with a static cache axis of " +
                                     std::to_string(layout_.max_seq) +
                                     " positions, as an in-place cache (engine.kv_in_place) needs; convert the model again");
  }
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

void TensorRTBackend::bind(const EngineStep& step, void* logits) {
  const size_t batch = static_cast<size_t>(step.batch), n = batch * static_cast<size_t>(step.width);
  host_lengths_.assign(step.past_lengths.begin(), step.past_lengths.end());
  host_lengths_.insert(host_lengths_.end(), step.seq_lens.begin(), step.seq_lens.end());
  // stream-ordered before the engine (or a replayed graph) reads them; the host vectors outlive the step's sync
  step_check(cudaMemcpyAsync(ids_.get(), step.ids.data(), n * 8, cudaMemcpyHostToDevice, stream_.get()), "input ids upload");
  step_check(cudaMemcpyAsync(lengths_.get(), host_lengths_.data(), 2 * batch * 8, cudaMemcpyHostToDevice, stream_.get()),
             "row lengths upload");
  if (layout_.routes_in)
    step_check(gather_routes(static_cast<const int64_t*>(ids_.get()), static_cast<int64_t>(n), layout_.top_k,
                             static_cast<const int32_t*>(table_ids_.get()), static_cast<const float*>(table_gates_.get()),
                             static_cast<int32_t*>(route_ids_.get()), static_cast<float*>(route_gates_.get()), stream_.get()),
               "routing table lookup");
  nvinfer1::IExecutionContext& ctx = *contexts_[step.profile];
  namespace dc = decoder_contract;
  for (const TensorBinding& t : step_bindings(layout_, step.batch, step.width)) {
    void* address = nullptr;
    if (t.layer >= 0)
      address = kv(t.other_cache ? 1 - slot_ : slot_, t.layer, t.value);  // in place: present where its past is
    else if (t.name == dc::kInputIds)
      address = ids_.get();
    else if (t.name == dc::kPastLengths)
      address = lengths_.get();
    else if (t.name == dc::kSeqLens)
      address = static_cast<int64_t*>(lengths_.get()) + batch;
    else if (t.name == dc::kExpertIds)
      address = route_ids_.get();
    else if (t.name == dc::kGates)
      address = route_gates_.get();
    else if (t.name == dc::kLogits)
      address = logits;
    else
      fail(ADAFUSE_ERR_INTERNAL, engine_name_ + ": no buffer for tensor '" + t.name + "'");
    if (t.input) {
      nvinfer1::Dims dims{};
      dims.nbDims = static_cast<int32_t>(t.shape.size());
      for (size_t i = 0; i < t.shape.size(); ++i) dims.d[i] = t.shape[i];
      if (!ctx.setInputShape(t.name.c_str(), dims))
        fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": TensorRT refused the shape of '" + t.name + "' (see its log)");
    }
    if (!ctx.setTensorAddress(t.name.c_str(), address))
      fail(ADAFUSE_ERR_TENSORRT, engine_name_ + ": TensorRT refused the address of '" + t.name + "'");
  }
}

void TensorRTBackend::enqueue(int profile) {
  if (!contexts_[profile]->enqueueV3(stream_.get())) {
    const std::string message = engine_name_ + ": TensorRT execution failed (see the TensorRT log above)";
    if (cuda_context_lost()) mark_unusable(message);
    fail(ADAFUSE_ERR_TENSORRT, message);
  }
}

void TensorRTBackend::carry_rows(int32_t from) {
  int32_t live = from;  // 1 + the highest slot at or above `from` that holds tokens
  for (int32_t slot = from; slot < layout_.max_batch; ++slot)
    if (slot_length(slot) > 0) live = slot + 1;
  if (live == from) return;
  const size_t offset = static_cast<size_t>(from) * kv_bytes_per_row_;
  const size_t bytes = static_cast<size_t>(live - from) * kv_bytes_per_row_;
  for (int32_t l = 0; l < layout_.layers; ++l)
    for (bool value : {false, true})
      step_check(cudaMemcpyAsync(static_cast<char*>(kv(1 - slot_, l, value)) + offset,
                                 static_cast<const char*>(kv(slot_, l, value)) + offset, bytes, cudaMemcpyDeviceToDevice,
                                 stream_.get()),
                 "KV cache carry");
}

void TensorRTBackend::run(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids,
                          float* gates) {
  const EngineStep step = plan_step(layout_, ids, rows, n_rows);
  const size_t row = static_cast<size_t>(layout_.vocab) * sizeof(float);
  const size_t positions = static_cast<size_t>(step.batch) * static_cast<size_t>(step.width);
  void* device_logits =
      step.profile == kDecode ? step_logits_.get() : prefill_logits_.ensure(positions * row, "prefill logits");
  bind(step, device_logits);
  // A captured decode step replays only with the same shapes and addresses (graph_cache.h): here the batch and
  // the ping-pong buffer (always 0 in place: one cache), the lengths being data. The first sight runs plainly, the
  // second also captures, later ones replay.
  Graphs::Entry* graph =
      step.profile == kDecode && cuda_graphs_ ? &graphs_.touch({step.batch, layout_.max_seq, slot_}) : nullptr;
  if (graph != nullptr && graph->exec != nullptr) {
    step_check(cudaGraphLaunch(graph->exec, stream_.get()), "CUDA graph launch");
  } else {
    enqueue(step.profile);
    if (graph != nullptr && ++graph->seen >= 2) capture(*graph);
  }
  if (!layout_.kv_in_place) carry_rows(step.batch);  // in place, rows beyond the batch stay where they are
  const size_t k = static_cast<size_t>(layout_.top_k);
  size_t out = 0, token = 0;
  for (size_t r = 0; r < static_cast<size_t>(n_rows); ++r) {
    const EngineStep::Span& lg = step.logits[r];
    step_check(cudaMemcpyAsync(logits + out * static_cast<size_t>(layout_.vocab),
                               static_cast<const char*>(device_logits) + static_cast<size_t>(lg.first) * row,
                               static_cast<size_t>(lg.count) * row, cudaMemcpyDeviceToHost, stream_.get()),
               "logits download");
    out += static_cast<size_t>(lg.count);
    const EngineStep::Span& tk = step.tokens[r];
    const size_t bytes = static_cast<size_t>(tk.count) * k * 4, from = static_cast<size_t>(tk.first) * k * 4;
    if (k > 0 && expert_ids != nullptr)  // the routes the engine was fed or chose
      step_check(cudaMemcpyAsync(expert_ids + token * k, static_cast<const char*>(route_ids_.get()) + from, bytes,
                                 cudaMemcpyDeviceToHost, stream_.get()),
                 "routes download");
    if (k > 0 && gates != nullptr)
      step_check(cudaMemcpyAsync(gates + token * k, static_cast<const char*>(route_gates_.get()) + from, bytes,
                                 cudaMemcpyDeviceToHost, stream_.get()),
                 "routes download");
    token += static_cast<size_t>(tk.count);
  }
  step_check(cudaStreamSynchronize(stream_.get()), step.profile == kDecode ? "decode step" : "prefill step");
  slot_ = (slot_ + 1) % layout_.cache_buffers();  // the present becomes the past: the other cache, or the same one
}

void TensorRTBackend::do_step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids,
                              float* gates) {
  run(ids, rows, n_rows, logits, expert_ids, gates);
}

// An equal-length batch is slots 0..batch-1: from position 0 (prefill) or continuing (decode).
void TensorRTBackend::do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits,
                                 int32_t* expert_ids, float* gates) {
  std::vector<StepRow> rows(static_cast<size_t>(batch));
  for (int32_t b = 0; b < batch; ++b) rows[static_cast<size_t>(b)] = StepRow{b, 0, len, all_positions};
  run(ids, rows.data(), batch, logits, expert_ids, gates);
}

void TensorRTBackend::do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) {
  std::vector<StepRow> rows(static_cast<size_t>(batch));
  for (int32_t b = 0; b < batch; ++b) rows[static_cast<size_t>(b)] = StepRow{b, past_length(), 1, false};
  run(ids, rows.data(), batch, logits, expert_ids, gates);
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

// [batch, kv_heads, past, head_dim] float32 out of the slots' [max_seq] rows.
void TensorRTBackend::do_read_kv(int32_t layer, bool value, float* out) const {
  const size_t past = static_cast<size_t>(past_length()), d = static_cast<size_t>(layout_.head_dim);
  const size_t heads = static_cast<size_t>(batch()) * static_cast<size_t>(layout_.kv_heads), n = heads * past * d;
  const size_t elt = dtype_bytes(layout_.kv_dtype);
  std::vector<uint16_t> raw(layout_.kv_dtype == "float" ? 0 : n);
  void* dst = layout_.kv_dtype == "float" ? static_cast<void*>(out) : static_cast<void*>(raw.data());
  cuda_check(cudaMemcpy2D(dst, past * d * elt, kv(slot_, layer, value), static_cast<size_t>(layout_.max_seq) * d * elt,
                          past * d * elt, heads, cudaMemcpyDeviceToHost),
             "KV cache download");
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
