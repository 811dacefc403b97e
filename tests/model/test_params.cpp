#include <gtest/gtest.h>

#include "core/error.h"
#include "model/params.h"

using namespace mop;

TEST(Params, PresetSizesMatchDesign) {
  // DESIGN.md: total / active parameters.
  struct Case { const char* preset; double total_b, active_b; };
  for (Case k : {Case{"moe-1b", 0.70, 0.14}, Case{"moe-7b", 5.62, 1.09}, Case{"qwen3-30b-a3b", 30.5, 3.0}}) {
    ModelConfig c = model_preset(k.preset);
    ModelCounts n = model_counts(c);
    EXPECT_NEAR(double(n.total) / 1e9, k.total_b, 0.011 * k.total_b + 0.005) << k.preset;
    EXPECT_NEAR(double(n.active_matmul) / 1e9, k.active_b, 0.05 * k.active_b) << k.preset;
  }
}

TEST(Params, TableAgreesWithCountsAndHfNames) {
  ModelConfig c = model_preset("tiny");
  ParamTable t = build_param_table(c);
  EXPECT_EQ(t.total, model_counts(c).total);
  EXPECT_NO_THROW(t.find("model.layers.1.mlp.experts.7.down_proj.weight"));
  EXPECT_NO_THROW(t.find("model.layers.0.self_attn.q_norm.weight"));
  EXPECT_NO_THROW(t.find("lm_head.weight"));
  const ParamSpec& q = t.find("model.layers.0.self_attn.q_proj.weight");
  const ParamSpec& k = t.find("model.layers.0.self_attn.k_proj.weight");
  const ParamSpec& v = t.find("model.layers.0.self_attn.v_proj.weight");
  EXPECT_EQ(k.offset, q.offset + q.numel);  // fused qkv layout
  EXPECT_EQ(v.offset, k.offset + k.numel);
  const ParamSpec& g3 = t.find("model.layers.0.mlp.experts.3.gate_proj.weight");
  const ParamSpec& u3 = t.find("model.layers.0.mlp.experts.3.up_proj.weight");
  EXPECT_EQ(u3.offset, g3.offset + g3.numel);
  EXPECT_EQ(q.shape, (std::vector<int64_t>{64, 64}));
  EXPECT_FALSE(t.find("model.embed_tokens.weight").decay);
  EXPECT_FALSE(t.find("model.norm.weight").decay);
  EXPECT_TRUE(t.find("lm_head.weight").decay);
  try {
    t.find("model.layers.0.self_attn.q_prj.weight");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("q_proj"), std::string::npos) << e.what();
  }
}

TEST(Params, InitIsLayoutIndependentAndSeeded) {
  ModelConfig c = model_preset("tiny");
  ParamTable t = build_param_table(c);
  std::vector<float> a(size_t(t.total)), b(size_t(t.total)), d(size_t(t.total));
  init_params(t, a.data(), 1);
  init_params(t, b.data(), 1);
  init_params(t, d.data(), 2);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, d);
  const ParamSpec& n = t.find("model.layers.0.input_layernorm.weight");
  EXPECT_EQ(a[size_t(n.offset)], 1.f);
}

TEST(Params, ValidationNamesTheValues) {
  auto expect_error = [](ModelConfig c, const std::string& needle) {
    try {
      c.validate();
      FAIL() << "expected an error containing " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  ModelConfig c = model_preset("tiny");
  ModelConfig a = c;
  a.head_dim = 0, a.heads = 5;
  expect_error(a, "model.heads = 5 does not divide model.hidden = 64");
  ModelConfig b = c;
  b.top_k = 9;
  expect_error(b, "model.top_k = 9 exceeds model.experts = 8");
  ModelConfig d = c;
  d.kv_heads = 3;
  expect_error(d, "model.kv_heads = 3 does not divide model.heads = 4");
}
