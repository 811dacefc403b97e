// The whole model: fp64 gradients against central finite differences, recomputation gives
// bit-identical gradients, and MoE edge cases.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "model/decoder.h"

using namespace mop;

namespace {

struct PackedBatch {
  std::vector<int32_t> tokens, targets, positions, cu;
  TokenBatch view() const {
    return TokenBatch{int(tokens.size()), tokens.data(), targets.data(), positions.data(), cu.data(),
                      int(cu.size()) - 1};
  }
};

// Documents of the given lengths packed into one stream, random tokens, one ignored target.
PackedBatch make_batch(const std::vector<int>& doc_lens, int vocab, uint64_t seed) {
  PackedBatch b;
  Rng rng(seed);
  b.cu.push_back(0);
  for (int len : doc_lens) {
    for (int i = 0; i < len; ++i) {
      b.tokens.push_back(int32_t(rng.below(uint64_t(vocab))));
      b.targets.push_back(int32_t(rng.below(uint64_t(vocab))));
      b.positions.push_back(i);
    }
    b.cu.push_back(int32_t(b.tokens.size()));
  }
  b.targets[1] = -100;
  return b;
}

ModelConfig qwen_like() {
  ModelConfig c;
  c.vocab_size = 13, c.hidden = 12, c.layers = 2, c.heads = 4, c.kv_heads = 2, c.head_dim = 6;
  c.experts = 5, c.top_k = 2, c.expert_ffn = 7;
  c.init_std = 0.3;  // large weights so every path carries a visible gradient
  return c;
}

ModelConfig deepseek_like() {
  ModelConfig c = qwen_like();
  c.family = "deepseek_v3";
  c.layers = 3, c.dense_layers = 1, c.dense_ffn = 9;
  c.experts = 6, c.top_k = 2, c.shared_experts = 1;
  c.router = "sigmoid", c.router_groups = 3, c.router_topk_groups = 2, c.routed_scale = 2.5;
  c.qk_norm = false, c.tie_embeddings = true;
  return c;
}

// loss = ce_scale * sum CE + lb_scale * sum LB, as forward_backward defines it.
double objective(Decoder<double>& m, const TokenBatch& b, double ce_scale, double lb_scale) {
  LossStats s = m.forward_loss(b);
  return ce_scale * s.ce_sum + lb_scale * s.lb_sum;
}

void gradient_check(const ModelConfig& c, Recompute rc) {
  ParamTable t = build_param_table(c);
  std::vector<double> p(size_t(t.total)), g(size_t(t.total), 0.0);
  init_params(t, p.data(), 7);
  // Give the router bias (sigmoid routing) some spread so selection is not all ties.
  Rng r(3);
  for (const auto& s : t.params)
    if (s.role == ParamRole::router_bias)
      for (int64_t i = 0; i < s.numel; ++i) p[size_t(s.offset + i)] = 0.05 * r.normal();
  PackedBatch pb = make_batch({5, 1, 8}, int(c.vocab_size), 11);
  TokenBatch b = pb.view();
  Decoder<double> m(c, t);
  m.bind(p.data(), g.data());
  const double ce_scale = 1.0 / 13.0, lb_scale = 0.3;
  m.forward_backward(b, ce_scale, lb_scale, rc);

  int checked = 0;
  double worst = 0;
  for (const auto& s : t.params) {
    if (!s.trainable) continue;
    // A few elements of every parameter tensor: first, last and one in the middle.
    for (int64_t i : {int64_t(0), s.numel / 2, s.numel - 1}) {
      double& w = p[size_t(s.offset + i)];
      const double h = 1e-5, w0 = w;
      w = w0 + h;
      const double lp = objective(m, b, ce_scale, lb_scale);
      w = w0 - h;
      const double lm = objective(m, b, ce_scale, lb_scale);
      w = w0;
      const double fd = (lp - lm) / (2 * h);
      const double an = g[size_t(s.offset + i)];
      const double err = std::abs(fd - an) / std::max(1e-6, std::abs(fd) + std::abs(an));
      worst = std::max(worst, err);
      EXPECT_LT(err, 1e-5) << s.name << "[" << i << "]: analytic " << an << " vs finite difference " << fd;
      ++checked;
    }
  }
  EXPECT_GT(checked, 30);
}

}  // namespace

TEST(Decoder, GradientCheckQwenLikeFp64) { gradient_check(qwen_like(), Recompute::none); }
TEST(Decoder, GradientCheckDeepSeekLikeFp64) { gradient_check(deepseek_like(), Recompute::none); }
TEST(Decoder, GradientCheckWithRecomputeFp64) { gradient_check(qwen_like(), Recompute::full); }

TEST(Decoder, RecomputeGivesIdenticalGradients) {
  for (ModelConfig c : {qwen_like(), deepseek_like()}) {
    ParamTable t = build_param_table(c);
    std::vector<float> p(size_t(t.total)), g1(size_t(t.total), 0.f), g2(size_t(t.total), 0.f);
    init_params(t, p.data(), 5);
    PackedBatch pb = make_batch({9, 4, 3}, int(c.vocab_size), 2);
    Decoder<float> m(c, t);
    m.bind(p.data(), g1.data());
    LossStats a = m.forward_backward(pb.view(), 0.1f, 0.01f, Recompute::none);
    m.bind(p.data(), g2.data());
    LossStats b = m.forward_backward(pb.view(), 0.1f, 0.01f, Recompute::full);
    EXPECT_EQ(a.ce_sum, b.ce_sum);
    for (size_t i = 0; i < g1.size(); ++i) ASSERT_EQ(g1[i], g2[i]) << "first mismatch at element " << i;
  }
}

TEST(Decoder, AllTokensToOneExpertAndKEqualsE) {
  ModelConfig c = qwen_like();
  for (int64_t k : {int64_t(1), int64_t(2), c.experts}) {
    c.top_k = k;
    ParamTable t = build_param_table(c);
    std::vector<double> p(size_t(t.total)), g(size_t(t.total), 0.0);
    init_params(t, p.data(), 1);
    // Zero router rows: every expert ties for every token, and ties go to the lowest indices,
    // so with k = 1 all tokens land on expert 0 and the other experts get none.
    for (const auto& s : t.params)
      if (s.role == ParamRole::router)
        for (int64_t i = 0; i < s.numel; ++i) p[size_t(s.offset + i)] = 0.0;
    PackedBatch pb = make_batch({7}, int(c.vocab_size), 4);
    Decoder<double> m(c, t);
    m.bind(p.data(), g.data());
    LossStats st = m.forward_backward(pb.view(), 1.0 / 7, 0.0, Recompute::none);
    // Every token went to experts 0..k-1, nothing to the others (empty experts).
    for (int64_t l = 0; l < c.layers; ++l)
      for (int64_t e = 0; e < c.experts; ++e)
        EXPECT_EQ(st.counts[size_t(l * c.experts + e)], e < k ? 7 : 0) << "layer " << l << " expert " << e;
    EXPECT_TRUE(std::isfinite(st.ce_sum));
    // Experts that received no token get exactly zero gradient.
    for (const auto& s : t.params)
      if (s.expert >= k)
        for (int64_t i = 0; i < s.numel; ++i) ASSERT_EQ(g[size_t(s.offset + i)], 0.0) << s.name;
  }
}

TEST(Decoder, ForwardLossMatchesForwardBackward) {
  ModelConfig c = qwen_like();
  ParamTable t = build_param_table(c);
  std::vector<float> p(size_t(t.total)), g(size_t(t.total), 0.f);
  init_params(t, p.data(), 9);
  PackedBatch pb = make_batch({6, 6}, int(c.vocab_size), 8);
  Decoder<float> m(c, t);
  m.bind(p.data(), g.data());
  LossStats a = m.forward_loss(pb.view());
  LossStats b = m.forward_backward(pb.view(), 1.f, 0.f, Recompute::none);
  EXPECT_EQ(a.ce_sum, b.ce_sum);
  EXPECT_EQ(a.ce_tokens, 11);  // one of 12 targets is ignored
  EXPECT_EQ(a.lb_sum, b.lb_sum);
}

TEST(Decoder, DocumentsDoNotSeeEachOther) {
  // The second document's logits must not change when the first document changes.
  ModelConfig c = qwen_like();
  ParamTable t = build_param_table(c);
  std::vector<double> p(size_t(t.total));
  init_params(t, p.data(), 3);
  Decoder<double> m(c, t);
  m.bind(p.data(), nullptr);
  PackedBatch a = make_batch({4, 5}, int(c.vocab_size), 1), b = a;
  b.tokens[0] = (b.tokens[0] + 1) % int32_t(c.vocab_size);
  b.tokens[3] = (b.tokens[3] + 2) % int32_t(c.vocab_size);
  std::vector<double> la(size_t(c.vocab_size)), lb(size_t(c.vocab_size));
  m.logits_at(a.view(), 8, la.data());
  m.logits_at(b.view(), 8, lb.data());
  // Equal up to fp64 rounding: the expert GEMMs see other row counts, so blocking may differ.
  for (size_t v = 0; v < la.size(); ++v) EXPECT_NEAR(la[v], lb[v], 1e-12 * (1 + std::abs(la[v])));
  m.logits_at(a.view(), 3, la.data());
  m.logits_at(b.view(), 3, lb.data());
  EXPECT_GT(std::abs(la[0] - lb[0]), 1e-6);
}
