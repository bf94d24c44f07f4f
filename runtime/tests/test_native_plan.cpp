// The native backend's device-memory plan (native_plan.h), a pure host function: every buffer aligned and
// apart, and the sizes against counts written out here from the model's dimensions.
#include <gtest/gtest.h>

#include <algorithm>

#include "error.h"
#include "native_plan.h"

namespace adafuse {
namespace {

// A Llama-shaped artifact in memory: 2 layers, pre-gated (table), grouped adapters on every stage.
NativeArtifact llama(const std::string& dtype = "bfloat16") {
  NativeArtifact a;
  a.family = "llama";
  a.dtype = dtype;
  a.vocab = 1000;
  a.hidden = 64;
  a.intermediate = 96;
  a.layers = 2;
  a.heads = 4;
  a.kv_heads = 2;
  a.head_dim = 16;
  a.max_positions = 128;
  a.norm = "rms";
  a.activation = "silu";
  a.rotary_dim = 16;
  a.routing_kind = "pregate";
  a.expert_kind = "linear";
  a.pregate_input = "attn_norm_0";
  a.routes_file = std::filesystem::path("routes.safetensors");
  a.num_experts = 4;
  a.top_k = 2;
  a.max_batch = 3;
  a.max_seq = 100;
  const int64_t q = 64, kv = 32;
  const int64_t in[] = {64, 64, 64, 96}, out[] = {q + 2 * kv, 64, 192, 64};
  const char* names[] = {"qkv", "o", "gate_up", "down"};
  for (int l = 0; l < 2; ++l) {
    std::vector<NativeStage> stages;
    for (int s = 0; s < 4; ++s) {
      NativeStage st;
      st.name = names[s];
      st.in_features = in[s];
      st.out_features = out[s];
      st.adapter = "grouped";
      st.experts = 4;
      st.rank = 8;
      NativeModule m;
      m.name = std::string(names[s]) + "_proj";
      m.rank = 8;
      m.row_end = out[s];
      st.modules.push_back(m);
      stages.push_back(st);
    }
    a.stages.push_back(stages);
  }
  return a;
}

void expect_laid_out(const NativePlan& p) {
  size_t end = 0;
  for (const NativeBuffer& b : p.buffers) {
    EXPECT_EQ(b.offset % kNativeAlignment, 0u) << b.name;
    EXPECT_GE(b.offset, end) << b.name << " overlaps the buffer before it";
    end = b.offset + b.bytes;
  }
  EXPECT_GE(p.total, end);
  EXPECT_LT(p.total - end, kNativeAlignment);
}

TEST(NativePlan, SizesFollowTheModelAndTheLimits) {
  const NativeArtifact a = llama();
  NativeLimits limits;
  limits.max_batch = 3;
  limits.max_seq = 100;
  const NativePlan p = plan_native(a, {{"embed_tokens", 1000 * 64 * 2}, {"final_norm", 64 * 2}}, limits);
  expect_laid_out(p);
  EXPECT_EQ(p.dims.tokens, 300);  // 512 by default, at most max_batch x max_seq
  EXPECT_EQ(p.limits.max_step_tokens, 300);
  EXPECT_EQ(p.group_bytes("weights"), size_t(1000 * 64 * 2 + 64 * 2));
  EXPECT_EQ(p.group_bytes("kv cache"), size_t(2 * 2 * 3 * 2 * 100 * 16 * 2));  // layers x {k, v} x slots x kv heads x seq x D x bf16
  EXPECT_EQ(p.at("kv.1.value").bytes, size_t(3 * 2 * 100 * 16 * 2));
  EXPECT_EQ(p.at("qkv").bytes, size_t(300 * 128 * 2));
  EXPECT_EQ(p.at("gate_up").bytes, size_t(300 * 192 * 2));
  EXPECT_EQ(p.at("logits_f32").bytes, size_t(64 * 1000 * 4));  // LM head passes of max(max_batch, 64) rows
  EXPECT_EQ(p.at("routes.table_ids").bytes, size_t(1000 * 2 * 4));
  EXPECT_EQ(p.at("routes.ids").bytes, size_t(300 * 2 * 4));
  EXPECT_FALSE(p.has("x_rep"));
  EXPECT_FALSE(p.has("switch.sites"));
  // a workspace per lora_linear call site (4 stages x 2 layers + the LM head) and the shared ones
  size_t sites = 0;
  for (const NativeBuffer& b : p.buffers) sites += b.name.rfind("ws.site.", 0) == 0 ? 1 : 0;
  EXPECT_EQ(sites, 9u);
  EXPECT_GT(p.at("ws.shared").bytes, 0u);
  EXPECT_GT(p.at("ws.attention").bytes, 0u);
}

TEST(NativePlan, StepTokensOptionAndItsFloor) {
  NativeArtifact a = llama();
  NativeLimits limits;
  limits.max_batch = 3;
  limits.max_seq = 100;
  limits.max_step_tokens = 40;
  EXPECT_EQ(plan_native(a, {}, limits).dims.tokens, 40);
  limits.max_step_tokens = 2;
  try {
    plan_native(a, {}, limits);
    FAIL() << "a step smaller than max_batch was accepted";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "max_step_tokens 2: a decode step of every slot needs at least max_batch (3) tokens");
  }
}

TEST(NativePlan, FfnExpertsRunEachTokenOncePerRoute) {
  NativeArtifact a = llama("float32");
  a.routing_kind = "layerwise";
  a.expert_kind = "ffn";
  a.routes_file.reset();
  a.pregate_input.clear();
  NativeLimits limits;
  limits.max_batch = 3;
  limits.max_seq = 100;
  const NativePlan p = plan_native(a, {}, limits);
  expect_laid_out(p);
  EXPECT_EQ(p.dims.mlp_rows, 600);
  EXPECT_EQ(p.at("gate_up").bytes, size_t(600 * 192 * 4));
  EXPECT_EQ(p.at("x_rep").bytes, size_t(600 * 64 * 4));
  EXPECT_EQ(p.at("mix").bytes, size_t(300 * 64 * 4));
  EXPECT_EQ(p.at("routes.expand").bytes, size_t(600 * 4));
  EXPECT_FALSE(p.has("routes.table_ids"));
}

TEST(NativePlan, SwitchKeepsALiveCopyOfEveryAdaptedWeight) {
  NativeArtifact a = llama();
  a.max_batch = 1;
  NativeLimits limits;
  limits.max_batch = 1;
  limits.max_seq = 100;
  limits.switch_strategy = true;
  const NativePlan p = plan_native(a, {}, limits);
  expect_laid_out(p);
  EXPECT_EQ(p.at("switch:layers.1.gate_up.weight").bytes, size_t(192 * 64 * 2));
  EXPECT_EQ(p.group_bytes("weights"), size_t(2 * (128 * 64 + 64 * 64 + 192 * 64 + 64 * 96) * 2));
  EXPECT_EQ(p.dims.tokens, 100);
}

// FP8 weights: the live copies the switch merges into are in the model dtype (two bytes an element), beside the
// FP8 bases (one byte) and their scales.
TEST(NativePlan, SwitchOfFp8WeightsKeepsSixteenBitLiveCopies) {
  NativeArtifact a = llama();
  a.fp8_weights = true;
  a.max_batch = 1;
  NativeLimits limits;
  limits.max_batch = 1;
  limits.max_seq = 100;
  limits.switch_strategy = true;
  const NativePlan p = plan_native(a, {{"layers.1.gate_up.weight", 192 * 64}}, limits);
  expect_laid_out(p);
  EXPECT_EQ(p.at("w:layers.1.gate_up.weight").bytes, size_t(192 * 64));
  EXPECT_EQ(p.at("switch:layers.1.gate_up.weight").bytes, size_t(192 * 64 * 2));
  EXPECT_TRUE(p.has("switch.sites"));
}

// cuBLASLt (more than 16 rows, 16-bit weights): its workspace, the shrink's t (float32) and routed z (the model
// dtype) for the widest adapter site, and a B_cat [out, E * rank] beside each adapted site's lora_B.
TEST(NativePlan, CublasLtBuffersForSixteenBitWeights) {
  NativeArtifact a = llama();
  NativeLimits limits;
  limits.max_batch = 3;
  limits.max_seq = 100;
  const NativePlan without = plan_native(a, {}, limits);
  limits.cublaslt = true;
  const NativePlan p = plan_native(a, {}, limits);
  expect_laid_out(p);
  EXPECT_EQ(p.at("ws.cublaslt").bytes, kNativeCublasLtWorkspace);
  EXPECT_EQ(p.at("ws.cublaslt").group, "workspaces");
  EXPECT_EQ(p.at("lt.t").bytes, size_t(300 * 4 * 8 * 4));  // 300 tokens x 4 experts x rank 8, float32
  EXPECT_EQ(p.at("lt.z").bytes, size_t(300 * 4 * 8 * 2));
  EXPECT_EQ(p.at("lt.b_cat.layers.0.qkv").bytes, size_t(128 * 4 * 8 * 2));
  EXPECT_EQ(p.at("lt.b_cat.layers.1.down").bytes, size_t(64 * 4 * 8 * 2));
  EXPECT_FALSE(p.has("lt.b_cat.lm_head"));  // no adapter: the dense GEMM needs only the workspace
  const size_t b_cat = 2 * (128 + 64 + 192 + 64) * 4 * 8 * 2;
  EXPECT_EQ(p.group_bytes("weights"), without.group_bytes("weights") + b_cat);
  EXPECT_EQ(p.group_bytes("activations"), without.group_bytes("activations") + 300 * 4 * 8 * 6);
  EXPECT_EQ(p.group_bytes("workspaces"), without.group_bytes("workspaces") + kNativeCublasLtWorkspace);
  for (const NativeBuffer& b : without.buffers) EXPECT_EQ(b.name.find("lt."), std::string::npos) << b.name;
  EXPECT_FALSE(without.has("ws.cublaslt"));

  // MixLoRA's FFN stages see top_k rows per token: their t and z are the widest
  a.routing_kind = "layerwise";
  a.expert_kind = "ffn";
  a.routes_file.reset();
  EXPECT_EQ(plan_native(a, {}, limits).at("lt.t").bytes, size_t(600 * 4 * 8 * 4));
}

TEST(NativePlan, CublasLtLeavesFp8AndFloat32WeightsToTheKernels) {
  NativeLimits limits;
  limits.max_batch = 3;
  limits.max_seq = 100;
  limits.cublaslt = true;
  NativeArtifact fp8 = llama();
  fp8.fp8_weights = true;
  const NativePlan p = plan_native(fp8, {}, limits);
  EXPECT_TRUE(p.has("ws.cublaslt"));  // the LM head stays 16-bit
  for (const NativeBuffer& b : p.buffers) EXPECT_NE(b.name.rfind("lt.", 0), 0u) << b.name;
  const NativePlan f32 = plan_native(llama("float32"), {}, limits);
  EXPECT_FALSE(f32.has("ws.cublaslt"));
  EXPECT_FALSE(f32.has("lt.t"));
  // a site of at most 16 rows never reaches cuBLASLt
  limits.max_batch = 1;
  limits.max_seq = 16;
  NativeArtifact small = llama();
  small.max_batch = 1;
  small.max_seq = 16;
  EXPECT_FALSE(plan_native(small, {}, limits).has("lt.t"));
}

TEST(NativePlan, InputsArePackedAligned) {
  const NativeInputLayout l = native_input_layout(5, 3);
  for (size_t offset : {l.ids, l.positions, l.slots, l.use_long_full, l.use_long_sliding, l.seq_starts, l.seq_slots, l.gather})
    EXPECT_EQ(offset % 16, 0u);
  EXPECT_GE(l.positions, l.ids + 5 * 8);
  EXPECT_GE(l.seq_slots, l.seq_starts + 4 * 4);  // max_batch + 1 starts
  EXPECT_GE(l.bytes, l.gather + 5 * 4);
}

}  // namespace
}  // namespace adafuse
