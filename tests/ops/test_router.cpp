#include "ops/cpu/router.h"

#include <numeric>

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  RouterConfig cfg;
  bool bias;
  int N;
};
RouterConfig cfg(RouterKind kind, int E, int K, bool norm, int groups = 1, int topk_groups = 1, double scale = 1.0) {
  RouterConfig c;
  c.kind = kind, c.E = E, c.K = K, c.norm_topk = norm, c.n_groups = groups, c.topk_groups = topk_groups;
  c.routed_scale = scale;
  return c;
}
const Case kCases[] = {
    {cfg(RouterKind::softmax, 8, 2, true), false, 7},
    {cfg(RouterKind::softmax, 8, 2, false), false, 33},
    {cfg(RouterKind::softmax, 5, 5, true), false, 7},  // K == E
    {cfg(RouterKind::sigmoid, 16, 4, true, 1, 1, 2.5), true, 33},
    {cfg(RouterKind::sigmoid, 16, 4, false), false, 1},
    {cfg(RouterKind::sigmoid, 16, 4, true, 4, 2, 2.5), true, 33},  // group-limited
    {cfg(RouterKind::softmax, 12, 3, true, 6, 3), false, 7},       // groups of 2
    {cfg(RouterKind::sigmoid, 6, 2, true, 6, 4), true, 7},         // groups of 1
};

// Independent reference: ranks with stable sorts (ties keep the lower index).
void ref_forward(Vec& probs, std::vector<int32_t>& idx, Vec& w, const Vec& logits, const Vec* bias,
                 const RouterConfig& c, int N) {
  const int E = c.E, K = c.K, gs = c.E / c.n_groups;
  probs.assign(size_t(N) * E, 0), idx.assign(size_t(N) * K, 0), w.assign(size_t(N) * K, 0);
  for (int n = 0; n < N; ++n) {
    const double* l = &logits[size_t(n) * E];
    double* p = &probs[size_t(n) * E];
    if (c.kind == RouterKind::softmax) {
      double z = 0;
      for (int e = 0; e < E; ++e) z += std::exp(l[e]);
      for (int e = 0; e < E; ++e) p[e] = std::exp(l[e]) / z;
    } else {
      for (int e = 0; e < E; ++e) p[e] = 1 / (1 + std::exp(-l[e]));
    }
    Vec s(E);
    for (int e = 0; e < E; ++e) s[e] = p[e] + (bias ? (*bias)[e] : 0.0);
    std::vector<int> eligible(E);
    std::iota(eligible.begin(), eligible.end(), 0);
    if (c.n_groups > 1) {
      Vec gscore(c.n_groups);
      for (int g = 0; g < c.n_groups; ++g) {
        Vec mem(s.begin() + g * gs, s.begin() + (g + 1) * gs);
        std::sort(mem.rbegin(), mem.rend());
        gscore[g] = mem[0] + (gs > 1 ? mem[1] : 0.0);
      }
      std::vector<int> groups(c.n_groups);
      std::iota(groups.begin(), groups.end(), 0);
      std::stable_sort(groups.begin(), groups.end(), [&](int a, int b) { return gscore[a] > gscore[b]; });
      eligible.clear();
      for (int e = 0; e < E; ++e)
        for (int t = 0; t < c.topk_groups; ++t)
          if (e / gs == groups[t]) eligible.push_back(e);
    }
    std::stable_sort(eligible.begin(), eligible.end(), [&](int a, int b) { return s[a] > s[b]; });
    double sum = 0;
    for (int k = 0; k < K; ++k) sum += p[eligible[k]];
    for (int k = 0; k < K; ++k) {
      idx[size_t(n) * K + k] = eligible[k];
      w[size_t(n) * K + k] = c.routed_scale * p[eligible[k]] / (c.norm_topk ? sum : 1.0);
    }
  }
}

template <class T> struct Out {
  std::vector<T> probs, w;
  std::vector<int32_t> idx;
};
template <class T> Out<T> run(const Vec& logits, const Vec* bias, const RouterConfig& c, int N) {
  auto l = to<T>(logits);
  std::vector<T> b = bias ? to<T>(*bias) : std::vector<T>();
  Out<T> o{nans<T>(size_t(N) * c.E), nans<T>(size_t(N) * c.K), std::vector<int32_t>(size_t(N) * c.K, -1)};
  router_forward<T>(o.probs.data(), o.idx.data(), o.w.data(), l.data(), bias ? b.data() : nullptr, c, N);
  return o;
}

std::string describe(const RouterConfig& c) {
  return fmt::format("{} E={} K={} norm={} groups={}/{} scale={}", c.kind == RouterKind::softmax ? "softmax" : "sigmoid",
                     c.E, c.K, c.norm_topk, c.topk_groups, c.n_groups, c.routed_scale);
}

}  // namespace

TEST(Router, ForwardMatchesReference) {
  for (const Case& t : kCases) {
    SCOPED_TRACE(describe(t.cfg));
    Rand r(t.cfg.E * 31 + t.cfg.K + t.N);
    Vec logits = r.normals(size_t(t.N) * t.cfg.E, 2.0), bias = r.normals(t.cfg.E, 0.1);
    const Vec* b = t.bias ? &bias : nullptr;
    Vec probs, w;
    std::vector<int32_t> idx;
    ref_forward(probs, idx, w, logits, b, t.cfg, t.N);
    auto d = run<double>(logits, b, t.cfg, t.N);
    EXPECT_EQ(d.idx, idx);
    EXPECT_TRUE(close(d.probs, probs, t.cfg.E));
    EXPECT_TRUE(close(d.w, w, t.cfg.E));
    auto f = run<float>(logits, b, t.cfg, t.N);
    EXPECT_EQ(f.idx, idx);  // random logits: no near-ties, fp32 picks the same experts
    EXPECT_TRUE(close(f.probs, probs, t.cfg.E));
    EXPECT_TRUE(close(f.w, w, t.cfg.E));
  }
}

TEST(Router, BackwardMatchesFiniteDifferences) {
  for (const Case& t : kCases) {
    for (bool with_dprobs : {true, false}) {
      SCOPED_TRACE(describe(t.cfg) + (with_dprobs ? " +dprobs" : ""));
      const RouterConfig& c = t.cfg;
      Rand r(c.E * 13 + c.K + t.N);
      Vec logits = r.normals(size_t(t.N) * c.E, 2.0), bias = r.normals(c.E, 0.1);
      Vec Rw = r.normals(size_t(t.N) * c.K), Rp = r.normals(size_t(t.N) * c.E);
      const Vec* b = t.bias ? &bias : nullptr;
      auto d = run<double>(logits, b, c, t.N);
      Vec dl(logits.size(), NAN);
      router_backward<double>(dl.data(), Rw.data(), with_dprobs ? Rp.data() : nullptr, d.probs.data(), d.idx.data(), c,
                              t.N);
      auto loss = [&] {  // selection held fixed, as backward assumes
        Vec probs, w;
        std::vector<int32_t> idx;
        ref_forward(probs, idx, w, logits, b, c, t.N);
        EXPECT_EQ(idx, d.idx);
        return dot(w, Rw) + (with_dprobs ? dot(probs, Rp) : 0.0);
      };
      EXPECT_TRUE(fd_check(logits, dl, loss));

      auto f = run<float>(logits, b, c, t.N);
      auto Rwf = to<float>(Rw), Rpf = to<float>(Rp);
      auto dlf = nans<float>(logits.size());
      router_backward<float>(dlf.data(), Rwf.data(), with_dprobs ? Rpf.data() : nullptr, f.probs.data(), f.idx.data(), c,
                             t.N);
      EXPECT_TRUE(close(dlf, dl, c.E));
    }
  }
}

TEST(Router, TiesPickLowestIndices) {
  for (RouterKind kind : {RouterKind::softmax, RouterKind::sigmoid}) {
    const int E = 8, K = 3;
    Vec logits(E, 0.25);  // all equal
    auto o = run<double>(logits, nullptr, cfg(kind, E, K, true), 1);
    EXPECT_EQ(o.idx, (std::vector<int32_t>{0, 1, 2}));
    for (double w : o.w) EXPECT_NEAR(w, 1.0 / 3, 1e-15);
    logits = {0, 1, 0, 1, 0, 1, 0, 1};  // equal pairs at the top
    o = run<double>(logits, nullptr, cfg(kind, E, K, true), 1);
    EXPECT_EQ(o.idx, (std::vector<int32_t>{1, 3, 5}));
  }
  // Tied groups: the lower group index wins.
  auto o = run<double>(Vec(8, 0.0), nullptr, cfg(RouterKind::sigmoid, 8, 2, true, 4, 2), 1);
  EXPECT_EQ(o.idx, (std::vector<int32_t>{0, 1}));
}

TEST(Router, GroupLimitedExcludesTheBestSingleExpert) {
  // All probs 0.5 (zero logits, sigmoid); biased scores per group of 2:
  // g0 {1.0, 0.0} = 1.0, g1 {0.625, 0.625} = 1.25, g2 {0.75, 0.5} = 1.25, g3 {0.5, 0.5} = 1.0.
  Vec bias = {0.5, -0.5, 0.125, 0.125, 0.25, 0.0, 0.0, 0.0};
  auto o = run<double>(Vec(8, 0.0), &bias, cfg(RouterKind::sigmoid, 8, 2, true, 4, 2, 3.0), 1);
  EXPECT_EQ(o.idx, (std::vector<int32_t>{4, 2}));       // expert 0 scores best but its group loses
  EXPECT_EQ(o.w, (std::vector<double>{1.5, 1.5}));      // weights from unbiased probs, renormalised, scaled
  o = run<double>(Vec(8, 0.0), &bias, cfg(RouterKind::sigmoid, 8, 2, false, 4, 1), 1);
  EXPECT_EQ(o.idx, (std::vector<int32_t>{2, 3}));       // g1 and g2 tie: g1
  EXPECT_EQ(o.w, (std::vector<double>{0.5, 0.5}));
  o = run<double>(Vec(8, 0.0), &bias, cfg(RouterKind::sigmoid, 8, 2, true), 1);  // no groups
  EXPECT_EQ(o.idx, (std::vector<int32_t>{0, 4}));
}

TEST(Router, AllExpertsSelectedWhenKEqualsE) {
  Rand r(5);
  Vec logits = r.normals(3 * 6);
  auto o = run<double>(logits, nullptr, cfg(RouterKind::softmax, 6, 6, true), 3);
  for (int n = 0; n < 3; ++n) {
    std::vector<int32_t> ids(o.idx.begin() + n * 6, o.idx.begin() + n * 6 + 6);
    std::sort(ids.begin(), ids.end());
    EXPECT_EQ(ids, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
    for (int k = 0; k < 6; ++k) EXPECT_NEAR(o.w[n * 6 + k], o.probs[n * 6 + o.idx[n * 6 + k]], 1e-15);
  }
}

TEST(Router, BadConfigThrows) {
  Vec l(8), p(8), w(8);
  std::vector<int32_t> idx(8);
  EXPECT_TRUE(throws_naming([&] { router_forward<double>(p.data(), idx.data(), w.data(), l.data(), nullptr,
                                                         cfg(RouterKind::softmax, 4, 5, true), 1); },
                            {"K=5", "E=4"}));
  EXPECT_TRUE(throws_naming([&] { router_forward<double>(p.data(), idx.data(), w.data(), l.data(), nullptr,
                                                         cfg(RouterKind::softmax, 8, 2, true, 3, 1), 1); },
                            {"n_groups=3"}));
}

TEST(LoadBalanceLoss, UniformRoutingGivesOne) {
  const int N = 8, E = 4, K = 2;
  Vec probs(size_t(N) * E, 0.25);
  std::vector<int32_t> idx(size_t(N) * K), counts(E);
  for (int a = 0; a < N * K; ++a) idx[a] = a % E;
  EXPECT_NEAR(moe_lb_loss_forward<double>(counts.data(), probs.data(), idx.data(), N, E, K), 1.0, 1e-15);
  EXPECT_EQ(counts, (std::vector<int32_t>{4, 4, 4, 4}));
}

TEST(LoadBalanceLoss, MatchesReferenceAndFiniteDifferences) {
  const int N = 33, E = 8, K = 2;
  Rand r(8);
  Vec logits = r.normals(size_t(N) * E);
  auto o = run<double>(logits, nullptr, cfg(RouterKind::softmax, E, K, true), N);
  Vec probs = o.probs;
  std::vector<int32_t> counts(E);
  const double loss = moe_lb_loss_forward<double>(counts.data(), probs.data(), o.idx.data(), N, E, K);
  std::vector<int32_t> ref_counts(E, 0);
  for (int32_t e : o.idx) ++ref_counts[e];
  EXPECT_EQ(counts, ref_counts);
  auto ref_loss = [&] {
    double l = 0;
    for (int e = 0; e < E; ++e)
      for (int n = 0; n < N; ++n) l += E * (double(ref_counts[e]) / (N * K)) * probs[n * E + e] / N;
    return l;
  };
  EXPECT_NEAR(loss, ref_loss(), 1e-14);
  const double dloss = 0.7;
  Vec g0 = r.normals(probs.size()), dp = g0;
  moe_lb_loss_backward<double>(dp.data(), dloss, counts.data(), N, E, K);
  EXPECT_TRUE(fd_check(probs, sub(dp, g0), [&] { return dloss * ref_loss(); }));
  auto pf = to<float>(probs);
  std::vector<int32_t> cf(E);
  EXPECT_NEAR(moe_lb_loss_forward<float>(cf.data(), pf.data(), o.idx.data(), N, E, K), loss, 1e-6);
  std::vector<int32_t> none;  // N == 0
  EXPECT_EQ(moe_lb_loss_forward<double>(cf.data(), nullptr, none.data(), 0, E, K), 0.0);
  moe_lb_loss_backward<double>(nullptr, 1.0, cf.data(), 0, E, K);
}
