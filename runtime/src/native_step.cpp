// The native backend's step: one execution path for prefill, decode and in-flight steps (rows of slot,
// start, count), in the order and with the rounding of reference/model.py (the kernels round where the
// reference does: adafuse_kernels.h).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "host_copies.h"
#include "lt_lora.h"
#include "native_backend_impl.h"
#include "native_mix.h"
#include "route_gather.h"

namespace adafuse::native_detail {

namespace {

constexpr const char* kStageNames[] = {"qkv", "o", "gate_up", "down"};  // native_artifact.h NativeStage, in order

int64_t role_width(const NativeArtifact& a, const std::string& role) {
  if (role == "q") return a.heads * a.head_dim;
  if (role == "k" || role == "v") return a.kv_heads * a.head_dim;
  if (role == "gate" || role == "up") return a.intermediate;
  return a.hidden;  // o, down
}

}  // namespace

RoleOut NativeBackend::role(size_t layer, int stage, const std::string& name, int32_t rows) const {
  const NativeStage& st = a_.stages[layer][static_cast<size_t>(stage)];
  char* buffer = at(kStageNames[stage]);
  const int64_t e = plan_.dims.elt;
  for (const NativeModule& m : st.modules) {
    int64_t col = 0;
    for (const std::string& r : m.roles) {
      if (r == name) {
        if (st.adapter == "per_module")  // each module wrote its own [rows, width] block (project)
          return {buffer + (int64_t{rows} * m.row_begin + col) * e, static_cast<long long>(m.row_end - m.row_begin)};
        return {buffer + (m.row_begin + col) * e, static_cast<long long>(st.out_features)};
      }
      col += role_width(a_, r);
    }
  }
  fail(ADAFUSE_ERR_INTERNAL, "native backend: stage " + st.name + " of layer " + std::to_string(layer) + " has no role " + name);
}

void NativeBackend::lora(size_t site, int32_t rows, const void* x, const void* W, const float* wscale, const void* bias,
                         const void* A,
                         const void* B, const int32_t* ids, const float* gates, void* y) {
  const NativeSite& s = sites_[site];
  const bool dense = A == nullptr, few = rows <= kNativeFewRows;
  if (!few && lt_ && wscale == nullptr && lt_lora(site, rows, x, W, bias, A, ids, gates, y)) return;
  // The few-rows kernels get their site's own workspace, kept for the backend's life, hence exclusive;
  // more rows share one workspace in stream order.
  const NativeBuffer& ws = plan_.at(few ? "ws.site." + s.name : "ws.shared");
  kl::adafuse_lora_options options{};
  options.exclusive_workspace = few ? 1 : 0;
  if (wscale != nullptr) {
    options.weight_dtype = kl::ADAFUSE_WEIGHT_FP8_E4M3;
    options.weight_scale = wscale;
  }
  kcheck(kl::adafuse_lora_linear(dtype_, rows, static_cast<int>(s.in), static_cast<int>(s.out), x, W, bias, A, B,
                                 dense ? 1 : static_cast<int>(s.experts), dense ? 1 : static_cast<int>(s.rank), ids, gates,
                                 dense ? 1 : static_cast<int>(s.top_k), 1.0f, y, base_ + ws.offset, ws.bytes, &options,
                                 stream_.stream),
         "adafuse_lora_linear at " + s.name + " (" + std::to_string(rows) + " rows)");
}

// The same projection through cuBLASLt (lt_lora.h says how it rounds).
bool NativeBackend::lt_lora(size_t site, int32_t rows, const void* x, const void* W, const void* bias, const void* A,
                            const int32_t* ids, const float* gates, void* y) {
  const NativeSite& s = sites_[site];
  if (A != nullptr && !plan_.has("lt.b_cat." + s.name)) return false;  // planned for the kernel library (native_cublaslt_adapter)
  LtLoraCall c;
  c.dtype = static_cast<int>(dtype_);
  c.rows = rows;
  c.in = s.in;
  c.out = s.out;
  c.x = x;
  c.W = W;
  c.bias = bias;
  c.y = y;
  if (A != nullptr) {
    c.A = A;
    c.b_cat = at("lt.b_cat." + s.name);
    c.experts = s.experts;
    c.rank = s.rank;
    c.top_k = s.top_k;
    c.ids = ids;
    c.gates = gates;
    c.t = reinterpret_cast<float*>(at("lt.t"));
    c.z = at("lt.z");
  }
  try {
    // no algorithm for one of its GEMMs: the kernel library writes all of y
    return lt_lora_linear(*lt_, c, stream_.stream, "cuBLASLt at " + s.name + " (" + std::to_string(rows) + " rows)");
  } catch (const Error& e) {
    device_failure(e.what());
  }
}

const void* NativeBackend::site_lora_b(const NativeSite& s) const {
  const NativeStage& st = a_.stages[static_cast<size_t>(s.layer)][static_cast<size_t>(s.stage)];
  const std::string p = "layers." + std::to_string(s.layer) + ".";
  return weight(p + (s.module >= 0 ? st.modules[static_cast<size_t>(s.module)].name : st.name) + ".lora_B");
}

void NativeBackend::project(size_t layer, int stage, const void* x, int32_t rows, const int32_t* ids, const float* gates,
                            bool merged) {
  const NativeStage& st = a_.stages[layer][static_cast<size_t>(stage)];
  const std::string p = "layers." + std::to_string(layer) + ".";
  const std::string sp = p + st.name + ".";
  const int64_t e = plan_.dims.elt;
  const char* W = static_cast<const char*>(weight(sp + "weight"));
  // FP8 weights: one byte an element, and each row's scale beside (a module's rows start at row_begin in both)
  const int64_t we = a_.fp8_weights ? 1 : e;
  const float* wscale = a_.fp8_weights ? static_cast<const float*>(weight(sp + "weight_scale")) : nullptr;
  const char* bias = st.bias ? static_cast<const char*>(weight(sp + "bias")) : nullptr;
  char* y = at(kStageNames[stage]);
  if (st.adapter == "per_module") {  // MoLA / LoRAMoE: each projection routes its own input
    for (size_t m = 0; m < st.modules.size(); ++m) {
      const NativeModule& mod = st.modules[m];
      const size_t site = site_index_.at({int64_t(layer), stage, int64_t(m)});
      const char* Wm = W + mod.row_begin * st.in_features * we;
      const float* sm = wscale ? wscale + mod.row_begin : nullptr;
      const char* bm = bias ? bias + mod.row_begin * e : nullptr;
      char* ym = y + int64_t{rows} * mod.row_begin * e;
      if (mod.rank == 0) {
        lora(site, rows, x, Wm, sm, bm, nullptr, nullptr, nullptr, nullptr, ym);
        continue;
      }
      const NativeSite& s = sites_[site];
      int32_t* site_ids = reinterpret_cast<int32_t*>(at("routes.site_ids"));
      float* site_gates = reinterpret_cast<float*>(at("routes.site_gates"));
      const bool normalize = a_.normalize_topk && a_.router_kind == "topk";  // a dense router keeps its softmax
      kcheck(kl::adafuse_route_topk(dtype_, rows, static_cast<int>(st.in_features), x, st.in_features,
                                    static_cast<const float*>(weight(p + mod.name + ".router")), nullptr,
                                    static_cast<int>(s.experts), static_cast<int>(s.top_k), normalize ? 1 : 0, site_ids,
                                    site_gates, stream_.stream),
             "adafuse_route_topk at " + s.name);
      lora(site, rows, x, Wm, sm, bm, weight(p + mod.name + ".lora_A"), weight(p + mod.name + ".lora_B"), site_ids, site_gates,
           ym);
    }
    return;
  }
  const size_t site = site_index_.at({int64_t(layer), stage, -1});
  if (st.adapter.empty()) {
    lora(site, rows, x, W, wscale, bias, nullptr, nullptr, nullptr, nullptr, y);
  } else if (merged) {  // switch: the token's experts are in the live weights
    lora(site, rows, x, at("switch:" + sp + "weight"), nullptr, bias, nullptr, nullptr, nullptr, nullptr, y);  // model dtype
  } else {
    lora(site, rows, x, W, wscale, bias, weight(sp + "lora_A"), weight(sp + "lora_B"), ids, gates, y);
  }
}

void NativeBackend::norm(void* h, const void* delta, const std::string& weight_name, void* out, int32_t rows) {
  kcheck(kl::adafuse_norm(dtype_, norm_kind_, rows, static_cast<int>(a_.hidden), h, a_.hidden, delta, a_.hidden,
                          weight(weight_name), static_cast<float>(a_.norm_eps), out, a_.hidden, stream_.stream),
         "adafuse_norm (" + weight_name + ")");
}

void NativeBackend::switch_now() {
  kcheck(kl::adafuse_switch(dtype_, reinterpret_cast<const kl::adafuse_switch_site*>(at("switch.sites")), switch_sites_,
                            switch_max_out_, switch_max_in_, reinterpret_cast<const int32_t*>(at("routes.ids")),
                            reinterpret_cast<const float*>(at("routes.gates")), reinterpret_cast<int32_t*>(at("switch.old_ids")),
                            reinterpret_cast<float*>(at("switch.old_gates")), static_cast<int>(a_.top_k), 1, stream_.stream),
         "adafuse_switch");
}

NativeBackend::Shape NativeBackend::prepare(const int64_t* ids, const std::vector<Row>& rows) {
  Shape s;
  s.rows = static_cast<int32_t>(rows.size());
  for (const Row& r : rows) {
    s.tokens += r.count;
    s.max_count = std::max(s.max_count, r.count);
  }
  s.merged = switch_ && s.tokens == 1;
  char* host = static_cast<char*>(host_inputs_.ptr);
  auto* h_ids = reinterpret_cast<int64_t*>(host + inputs_.ids);
  auto* h_pos = reinterpret_cast<int64_t*>(host + inputs_.positions);
  auto* h_slots = reinterpret_cast<int32_t*>(host + inputs_.slots);
  auto* h_long_full = reinterpret_cast<uint8_t*>(host + inputs_.use_long_full);
  auto* h_long_sliding = reinterpret_cast<uint8_t*>(host + inputs_.use_long_sliding);
  auto* h_starts = reinterpret_cast<int32_t*>(host + inputs_.seq_starts);
  auto* h_seq_slots = reinterpret_cast<int32_t*>(host + inputs_.seq_slots);
  auto* h_gather = reinterpret_cast<int32_t*>(host + inputs_.gather);
  std::copy(ids, ids + s.tokens, h_ids);
  logit_dest_.clear();
  int32_t n = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    const Row& row = rows[r];
    h_starts[r] = n;
    h_seq_slots[r] = row.slot;
    // LongRoPE: a row reaching past switch_at uses the long frequencies for the whole call (features.rope_cos_sin)
    const bool long_full = a_.rope.long_table && row.reach > a_.rope.switch_at;
    const bool long_sliding = a_.sliding_rope && a_.sliding_rope->long_table && row.reach > a_.sliding_rope->switch_at;
    for (int32_t i = 0; i < row.count; ++i, ++n) {
      h_pos[n] = row.start + i;
      h_slots[n] = row.slot;
      h_long_full[n] = long_full ? 1 : 0;
      h_long_sliding[n] = long_sliding ? 1 : 0;
      if (row.all_logits || i == row.count - 1) {
        h_gather[logit_dest_.size()] = n;
        logit_dest_.push_back(row.logits + (row.all_logits ? static_cast<int64_t>(i) * a_.vocab : 0));
      }
    }
  }
  h_starts[rows.size()] = n;
  s.logit_rows = static_cast<int32_t>(logit_dest_.size());
  last_gpu_ms_ = -1.0;
  check(cudaEventRecord(step_begin_.event, stream_.stream), "step timing event");
  check(cudaMemcpyAsync(at("inputs"), host, inputs_.bytes, cudaMemcpyHostToDevice, stream_.stream), "step inputs upload");
  return s;
}

void NativeBackend::enqueue_body(const Shape& s) {
  const char* in = at("inputs");
  const auto* ids = reinterpret_cast<const int64_t*>(in + inputs_.ids);
  const auto* positions = reinterpret_cast<const int64_t*>(in + inputs_.positions);
  const auto* slots = reinterpret_cast<const int32_t*>(in + inputs_.slots);
  const auto* starts = reinterpret_cast<const int32_t*>(in + inputs_.seq_starts);
  const auto* seq_slots = reinterpret_cast<const int32_t*>(in + inputs_.seq_slots);
  const int32_t N = s.tokens;
  const int hidden = static_cast<int>(a_.hidden);
  char *h = at("h"), *x = at("x"), *q_rot = at("q_rot"), *attn = at("attn"), *o = at("o"), *act = at("act");
  int32_t* route_ids = plan_.has("routes.ids") ? reinterpret_cast<int32_t*>(at("routes.ids")) : nullptr;
  float* route_gates = plan_.has("routes.gates") ? reinterpret_cast<float*>(at("routes.gates")) : nullptr;
  const bool ffn = a_.routing_kind == "layerwise" && a_.expert_kind == "ffn";
  const int k = static_cast<int>(a_.top_k);

  kcheck(kl::adafuse_embed(dtype_, N, hidden, a_.vocab, ids, weight("embed_tokens"), static_cast<float>(a_.embed_scale), h,
                           stream_.stream),
         "adafuse_embed");
  if (a_.routes_file) {
    check(gather_routes(ids, N, k, reinterpret_cast<const int32_t*>(at("routes.table_ids")),
                        reinterpret_cast<const float*>(at("routes.table_gates")), route_ids, route_gates, stream_.stream),
          "routing table lookup");
    if (s.merged) switch_now();
  }
  const void* delta = nullptr;  // the previous layer's MLP output, added to h with the next norm
  for (size_t l = 0; l < a_.stages.size(); ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    norm(h, delta, p + "attn_in_norm", x, N);
    project(l, 0, x, N, route_ids, route_gates, s.merged);
    const RoleOut q = role(l, 0, "q", N), kk = role(l, 0, "k", N), v = role(l, 0, "v", N);
    if (a_.qk_norm) {  // per head, before RoPE
      kcheck(kl::adafuse_head_norm(dtype_, norm_kind_, N, static_cast<int>(a_.heads), static_cast<int>(a_.head_dim), q.ptr, q.ld,
                                   weight(p + "q_norm"), static_cast<float>(a_.norm_eps), stream_.stream),
             "adafuse_head_norm (" + p + "q_norm)");
      kcheck(kl::adafuse_head_norm(dtype_, norm_kind_, N, static_cast<int>(a_.kv_heads), static_cast<int>(a_.head_dim), kk.ptr,
                                   kk.ld, weight(p + "k_norm"), static_cast<float>(a_.norm_eps), stream_.stream),
             "adafuse_head_norm (" + p + "k_norm)");
    }
    const bool sliding = std::find(a_.sliding_layers.begin(), a_.sliding_layers.end(), int64_t(l)) != a_.sliding_layers.end();
    const bool second_rope = sliding && a_.sliding_rope.has_value();  // Gemma 3's local RoPE
    const NativeRope& rope = second_rope ? *a_.sliding_rope : a_.rope;
    const std::string table = second_rope ? "rope.sliding." : "rope.full.";
    const uint8_t* use_long = reinterpret_cast<const uint8_t*>(in + (second_rope ? inputs_.use_long_sliding : inputs_.use_long_full));
    const std::string kv = "kv." + std::to_string(l) + ".";
    kcheck(kl::adafuse_rope_cache_write(
               dtype_, N, static_cast<int>(a_.heads), static_cast<int>(a_.kv_heads), static_cast<int>(a_.head_dim),
               static_cast<int>(a_.rotary_dim), q.ptr, q.ld, kk.ptr, kk.ld, v.ptr, v.ld,
               static_cast<const float*>(weight(table + "inv_freq")),
               rope.long_table ? static_cast<const float*>(weight(table + "long_inv_freq")) : nullptr,
               rope.long_table ? use_long : nullptr, static_cast<float>(rope.attention_factor), slots, positions, q_rot,
               at(kv + "key"), at(kv + "value"), a_.max_seq, stream_.stream),
           "adafuse_rope_cache_write (layer " + std::to_string(l) + ")");
    const NativeBuffer& ws = plan_.at("ws.attention");
    const int window = sliding ? static_cast<int>(*a_.sliding_window) : 0;
    kcheck(kl::adafuse_attention(dtype_, N, s.rows, s.max_count, static_cast<int>(a_.heads), static_cast<int>(a_.kv_heads),
                                 static_cast<int>(a_.head_dim), a_.max_seq, q_rot, at(kv + "key"), at(kv + "value"), starts,
                                 seq_slots, positions, window, static_cast<float>(a_.query_scale),
                                 a_.attn_softcap ? static_cast<float>(*a_.attn_softcap) : 0.0f, attn, base_ + ws.offset, ws.bytes,
                                 stream_.stream),
           "adafuse_attention (layer " + std::to_string(l) + ")");
    project(l, 1, attn, N, route_ids, route_gates, s.merged);
    if (a_.norms[1]) norm(o, nullptr, p + "attn_out_norm", o, N);  // Gemma: the block's output normed before the add
    norm(h, o, p + "mlp_in_norm", x, N);
    if (l == 0 && a_.routing_kind == "pregate" && !a_.routes_file) {  // the in-decoder pre-gate reads mlp_norm_0
      const bool bias = plan_.has("w:pregate.bias");
      kcheck(kl::adafuse_route_topk(dtype_, N, hidden, x, a_.hidden, static_cast<const float*>(weight("pregate.weight")),
                                    bias ? static_cast<const float*>(weight("pregate.bias")) : nullptr,
                                    static_cast<int>(a_.num_experts), k, a_.normalize_topk ? 1 : 0, route_ids, route_gates,
                                    stream_.stream),
             "adafuse_route_topk (pre-gate)");
      if (s.merged) switch_now();
    }
    void* mlp_out = at("down");
    if (ffn) {  // MixLoRA: each token runs its top-k FFNs (row n * k + j: expert ids[n, j], gate 1), then their gated sum
      const NativeStage& gu = a_.stages[l][2];
      const int experts = static_cast<int>(gu.experts > 0 ? gu.experts : a_.num_experts);
      kcheck(kl::adafuse_route_topk(dtype_, N, hidden, x, a_.hidden, static_cast<const float*>(weight(p + "mlp.router")), nullptr,
                                    experts, k, a_.normalize_topk ? 1 : 0, route_ids, route_gates, stream_.stream),
             "adafuse_route_topk (" + p + "mlp.router)");
      const int32_t M = N * k;
      kcheck(kl::adafuse_gather_rows(dtype_, M, hidden, x, a_.hidden, reinterpret_cast<const int32_t*>(at("routes.expand")),
                                     at("x_rep"), a_.hidden, stream_.stream),
             "adafuse_gather_rows (FFN expert inputs)");
      const float* ones = reinterpret_cast<const float*>(at("routes.ones"));
      project(l, 2, at("x_rep"), M, route_ids, ones, false);
      const RoleOut g = role(l, 2, "gate", M), u = role(l, 2, "up", M);
      kcheck(kl::adafuse_act_mul(dtype_, a_.activation == "silu" ? kl::ADAFUSE_ACT_SILU : kl::ADAFUSE_ACT_GELU_TANH, M,
                                 static_cast<int>(a_.intermediate), g.ptr, u.ptr, g.ld, act, stream_.stream),
             "adafuse_act_mul (layer " + std::to_string(l) + ")");
      project(l, 3, act, M, route_ids, ones, false);
      check(mix_experts(static_cast<int>(dtype_), N, k, a_.hidden, at("down"), route_gates, at("mix"), stream_.stream),
            "FFN experts' gated sum (layer " + std::to_string(l) + ")");
      mlp_out = at("mix");
    } else {
      project(l, 2, x, N, route_ids, route_gates, s.merged);
      const RoleOut g = role(l, 2, "gate", N), u = role(l, 2, "up", N);
      kcheck(kl::adafuse_act_mul(dtype_, a_.activation == "silu" ? kl::ADAFUSE_ACT_SILU : kl::ADAFUSE_ACT_GELU_TANH, N,
                                 static_cast<int>(a_.intermediate), g.ptr, u.ptr, g.ld, act, stream_.stream),
             "adafuse_act_mul (layer " + std::to_string(l) + ")");
      project(l, 3, act, N, route_ids, route_gates, s.merged);
    }
    if (a_.norms[3]) norm(mlp_out, nullptr, p + "mlp_out_norm", mlp_out, N);
    delta = mlp_out;
  }
  norm(h, delta, "final_norm", x, N);
}

// The LM head over logit rows [first, first + count) of the step (gathered from the final hidden states).
void NativeBackend::enqueue_head(int32_t first, int32_t count) {
  const int hidden = static_cast<int>(a_.hidden);
  const auto* gather = reinterpret_cast<const int32_t*>(at("inputs") + inputs_.gather) + first;
  kcheck(kl::adafuse_gather_rows(dtype_, count, hidden, at("x"), a_.hidden, gather, at("last"), a_.hidden, stream_.stream),
         "adafuse_gather_rows (LM head rows)");
  lora(sites_.size() - 1, count, at("last"), weight(a_.tied_head ? "embed_tokens" : "lm_head"), nullptr, nullptr, nullptr,
       nullptr, nullptr, nullptr, at("logits"));  // the head keeps the model dtype
  kcheck(kl::adafuse_logits_to_float(dtype_, count, a_.vocab, at("logits"), a_.vocab,
                                     a_.final_softcap ? static_cast<float>(*a_.final_softcap) : 0.0f,
                                     reinterpret_cast<float*>(at("logits_f32")), stream_.stream),
         "adafuse_logits_to_float");
}

void NativeBackend::capture(Graph& graph, const Shape& s) {
  cudaGraph_t captured = nullptr;
  check(cudaStreamBeginCapture(stream_.stream, cudaStreamCaptureModeThreadLocal), "CUDA graph capture");
  capturing_ = true;
  try {
    enqueue_body(s);
    enqueue_head(0, s.logit_rows);
  } catch (...) {
    capturing_ = false;
    cudaStreamEndCapture(stream_.stream, &captured);
    if (captured) cudaGraphDestroy(captured);
    cudaGetLastError();
    throw;
  }
  capturing_ = false;
  check(cudaStreamEndCapture(stream_.stream, &captured), "CUDA graph capture");
  const cudaError_t status = cudaGraphInstantiate(&graph.exec, captured, 0);
  cudaGraphDestroy(captured);
  if (status != cudaSuccess) {
    graph.exec = nullptr;
    check(status, "CUDA graph instantiation");
  }
}

void NativeBackend::run(const int64_t* ids, std::vector<Row>& rows) {
  set_device();
  const Shape s = prepare(ids, rows);
  const int32_t per_pass = static_cast<int32_t>(plan_.dims.logit_rows);
  // A decode step (one token per row) is replayed from the graph of its row count: the first such step
  // runs eagerly (the kernels' per-device setup happens outside capture), the second captures.
  const bool decode_shape = s.tokens == s.rows && s.logit_rows <= per_pass;
  Graph* graph = graphs_enabled_ && decode_shape ? &graphs_[s.rows] : nullptr;
  if (graph != nullptr && graph->exec == nullptr && graph->seen++ > 0) {
    try {
      capture(*graph, s);
    } catch (const Error& e) {  // a step that cannot be captured runs eagerly from now on (a real failure recurs there)
      std::fprintf(stderr, "[adafuse] %s: decode steps cannot be captured in CUDA graphs (%s); running them eagerly\n",
                   a_.dir.string().c_str(), e.what());
      graphs_enabled_ = false;
      graph = nullptr;
    }
  }
  // Every copy from the device buffer `src` that merge_host_copies makes of `pieces` (host_copies.h).
  auto download = [&](const char* src, const std::vector<std::pair<void*, size_t>>& pieces, const char* what) {
    for (const HostCopy& c : merge_host_copies(pieces))
      check(cudaMemcpyAsync(c.dest, src + c.offset, c.bytes, cudaMemcpyDeviceToHost, stream_.stream), what);
  };
  auto download_logits = [&](int32_t first, int32_t count) {  // logit rows first.. of the head's last pass
    std::vector<std::pair<void*, size_t>> pieces;
    for (int32_t i = 0; i < count; ++i)
      pieces.emplace_back(logit_dest_[size_t(first + i)], static_cast<size_t>(a_.vocab) * sizeof(float));
    download(at("logits_f32"), pieces, "logits download");
  };

  if (graph != nullptr && graph->exec != nullptr) {
    check(cudaGraphLaunch(graph->exec, stream_.stream), "CUDA graph launch");
    download_logits(0, s.logit_rows);
  } else {
    enqueue_body(s);
    for (int32_t first = 0; first < s.logit_rows; first += per_pass) {
      const int32_t count = std::min(per_pass, s.logit_rows - first);
      enqueue_head(first, count);
      download_logits(first, count);
    }
  }
  if (info_.top_k > 0) {  // the routes each token was fed
    std::vector<std::pair<void*, size_t>> ids, gates;
    for (const Row& r : rows) {
      const size_t bytes = static_cast<size_t>(r.count) * static_cast<size_t>(info_.top_k) * 4;
      ids.emplace_back(r.expert_ids, bytes);
      gates.emplace_back(r.gates, bytes);
    }
    download(at("routes.ids"), ids, "routes download");
    download(at("routes.gates"), gates, "routes download");
  }
  check(cudaEventRecord(step_end_.event, stream_.stream), "step timing event");
  check(cudaStreamSynchronize(stream_.stream), "native step");
  float ms = 0.f;
  check(cudaEventElapsedTime(&ms, step_begin_.event, step_end_.event), "step timing");
  last_gpu_ms_ = ms;
}

void NativeBackend::do_step(const int64_t* ids, const StepRow* rows, int32_t n_rows, float* logits, int32_t* expert_ids,
                            float* gates) {
  std::vector<Row> plan(static_cast<size_t>(n_rows));
  int64_t token = 0, logit = 0;
  const int64_t k = info_.top_k;
  for (int32_t r = 0; r < n_rows; ++r) {
    Row& row = plan[static_cast<size_t>(r)];
    row.slot = rows[r].slot;
    row.start = rows[r].start;
    row.count = rows[r].count;
    row.all_logits = rows[r].all_logits;
    row.reach = row.start + row.count;
    row.logits = logits + logit * a_.vocab;
    row.expert_ids = expert_ids ? expert_ids + token * k : nullptr;
    row.gates = gates ? gates + token * k : nullptr;
    logit += row.all_logits ? row.count : 1;
    token += row.count;
  }
  run(ids, plan);
}

// A prompt batch is slots 0..batch-1 from position 0, in chunks of at most max_step_tokens tokens; LongRoPE
// chooses its frequencies from the whole prompt, as the reference's single call does.
void NativeBackend::do_prefill(const int64_t* ids, int32_t batch, int32_t len, bool all_positions, float* logits,
                               int32_t* expert_ids, float* gates) {
  const int32_t chunk = std::max<int32_t>(1, static_cast<int32_t>(plan_.dims.tokens / batch));
  const int64_t k = info_.top_k;
  std::vector<int64_t> chunk_ids;
  for (int32_t c0 = 0; c0 < len; c0 += chunk) {
    const int32_t count = std::min(chunk, len - c0);
    const bool last = c0 + count == len;
    std::vector<Row> rows(static_cast<size_t>(batch));
    chunk_ids.clear();
    std::vector<float> unused;
    for (int32_t b = 0; b < batch; ++b) {
      Row& row = rows[static_cast<size_t>(b)];
      row.slot = b;
      row.start = c0;
      row.count = count;
      row.all_logits = all_positions;
      row.reach = len;
      const int64_t first = int64_t{b} * len + c0;
      chunk_ids.insert(chunk_ids.end(), ids + first, ids + first + count);
      if (all_positions) {
        row.logits = logits + first * a_.vocab;
      } else if (last) {
        row.logits = logits + int64_t{b} * a_.vocab;
      } else {
        if (unused.empty()) unused.resize(static_cast<size_t>(a_.vocab));
        row.logits = unused.data();  // a chunk before the last: its last position's logits are dropped
      }
      row.expert_ids = expert_ids ? expert_ids + first * k : nullptr;
      row.gates = gates ? gates + first * k : nullptr;
    }
    run(chunk_ids.data(), rows);
  }
}

void NativeBackend::do_decode(const int64_t* ids, int32_t batch, float* logits, int32_t* expert_ids, float* gates) {
  const int32_t past = past_length();
  const int64_t k = info_.top_k;
  std::vector<Row> rows(static_cast<size_t>(batch));
  for (int32_t b = 0; b < batch; ++b) {
    Row& row = rows[static_cast<size_t>(b)];
    row.slot = b;
    row.start = past;
    row.reach = past + 1;
    row.logits = logits + int64_t{b} * a_.vocab;
    row.expert_ids = expert_ids ? expert_ids + int64_t{b} * k : nullptr;
    row.gates = gates ? gates + int64_t{b} * k : nullptr;
  }
  run(ids, rows);
}

// [batch, kv_heads, past, head_dim] float32 out of the slots' [max_seq] rows.
void NativeBackend::do_read_kv(int32_t layer, bool value, float* out) const {
  set_device();
  const size_t e = static_cast<size_t>(plan_.dims.elt), D = static_cast<size_t>(a_.head_dim);
  const size_t past = static_cast<size_t>(past_length()), heads = static_cast<size_t>(batch()) * static_cast<size_t>(a_.kv_heads);
  const size_t n = heads * past * D;
  std::vector<uint16_t> raw(e == 4 ? 0 : n);
  void* dst = e == 4 ? static_cast<void*>(out) : static_cast<void*>(raw.data());
  const char* src = at("kv." + std::to_string(layer) + (value ? ".value" : ".key"));
  cuda_check(cudaMemcpy2D(dst, past * D * e, src, static_cast<size_t>(a_.max_seq) * D * e, past * D * e, heads,
                          cudaMemcpyDeviceToHost),
             "KV cache download");
  if (a_.dtype == "float16")
    for (size_t i = 0; i < n; ++i) out[i] = half_to_float(raw[i]);
  if (a_.dtype == "bfloat16")
    for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(raw[i]);
}

}  // namespace adafuse::native_detail
