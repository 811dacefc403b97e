#include "ops/cpu/adamw.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

// The header's formula in fp64.
void ref_step(Vec& p, const Vec& g, Vec& m, Vec& v, const AdamWStep& s) {
  const double b1 = s.beta1, b2 = s.beta2;
  for (size_t i = 0; i < p.size(); ++i) {
    const double gi = g[i] * s.grad_scale;
    p[i] *= 1 - double(s.lr) * s.weight_decay;
    m[i] = b1 * m[i] + (1 - b1) * gi;
    v[i] = b2 * v[i] + (1 - b2) * gi * gi;
    p[i] -= s.lr * (m[i] / (1 - std::pow(b1, s.step))) / (std::sqrt(v[i] / (1 - std::pow(b2, s.step))) + s.eps);
  }
}

}  // namespace

TEST(AdamW, MatchesFp64ReferenceOverSteps) {
  struct Case {
    size_t n;
    float lr, wd, grad_scale;
  };
  for (const Case& c : {Case{1, 1e-3f, 0.f, 1.f}, Case{17, 3e-4f, 0.1f, 0.5f}, Case{5000, 1e-2f, 0.01f, 2.f}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << c.n << " lr=" << c.lr << " wd=" << c.wd);
    Rand r(c.n);
    Vec p = r.normals(c.n), m(c.n, 0.0), v(c.n, 0.0);
    auto pf = to<float>(p), mf = to<float>(m), vf = to<float>(v);
    const int steps = 5;
    for (int t = 1; t <= steps; ++t) {
      Vec g = r.normals(c.n);
      auto gf = to<float>(g);
      AdamWStep s;
      s.lr = c.lr, s.weight_decay = c.wd, s.grad_scale = c.grad_scale, s.step = t;
      ref_step(p, g, m, v, s);
      adamw_step(pf.data(), gf.data(), mf.data(), vf.data(), c.n, s);
    }
    // Each step's update is lr * O(1): fp32 rounding of p dominates and grows with the steps.
    EXPECT_TRUE(close(pf, p, 4 * steps));
    EXPECT_TRUE(close(mf, m, 4 * steps));
    EXPECT_TRUE(close(vf, v, 4 * steps));
  }
}

TEST(AdamW, FirstStepMovesBySignTimesLr) {
  std::vector<float> p = {1.f, -2.f, 0.5f}, g = {3.f, -0.25f, 1e-3f}, m(3, 0.f), v(3, 0.f);
  AdamWStep s;
  s.lr = 0.01f, s.eps = 0.f;
  adamw_step(p.data(), g.data(), m.data(), v.data(), 3, s);
  EXPECT_FLOAT_EQ(p[0], 0.99f);
  EXPECT_FLOAT_EQ(p[1], -1.99f);
  EXPECT_FLOAT_EQ(p[2], 0.49f);
}

TEST(AdamW, SumSquaresMatchesReferenceAndIsDeterministic) {
  for (size_t n : {size_t(0), size_t(1), size_t(4095), size_t(4097), size_t(100003)}) {
    SCOPED_TRACE(n);
    Rand r(n + 1);
    auto g = to<float>(r.normals(n, 3.0));
    double ref = 0;
    for (float x : g) ref += double(x) * x;
    const double a = sum_squares(g.data(), n), b = sum_squares(g.data(), n);
    double c = 0;
    with_threads(1, [&] { c = sum_squares(g.data(), n); });
    EXPECT_NEAR(a, ref, 1e-13 * (ref + 1));
    EXPECT_TRUE(same_bits(std::vector<double>{a}, std::vector<double>{b}));
    EXPECT_TRUE(same_bits(std::vector<double>{a}, std::vector<double>{c}));
  }
}
