#include "ops/cpu/swiglu.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  int N, F;
};
const Case kCases[] = {{1, 5}, {7, 17}, {33, 64}};

Vec ref_forward(const Vec& gu, int N, int F) {
  Vec h(size_t(N) * F);
  for (int n = 0; n < N; ++n)
    for (int f = 0; f < F; ++f) {
      const double g = gu[n * 2 * F + f], u = gu[n * 2 * F + F + f];
      h[n * F + f] = g / (1 + std::exp(-g)) * u;
    }
  return h;
}

}  // namespace

TEST(SwiGLU, ForwardMatchesReference) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " F=" << c.F);
    Rand r(c.N * 2 + c.F);
    Vec gu = r.normals(size_t(c.N) * 2 * c.F, 3.0);
    Vec ref = ref_forward(gu, c.N, c.F);
    auto run = [&]<class T>(T) {
      auto g = to<T>(gu);
      auto h = nans<T>(ref.size());
      swiglu_forward<T>(h.data(), g.data(), c.N, c.F);
      EXPECT_TRUE(close(h, ref, 2));
    };
    run(double{});
    run(float{});
  }
}

TEST(SwiGLU, BackwardMatchesFiniteDifferences) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " F=" << c.F);
    Rand r(c.N * 4 + c.F);
    Vec gu = r.normals(size_t(c.N) * 2 * c.F, 3.0), R = r.normals(size_t(c.N) * c.F);
    Vec dgu(gu.size(), NAN);
    swiglu_backward<double>(dgu.data(), R.data(), gu.data(), c.N, c.F);
    auto loss = [&] { return dot(ref_forward(gu, c.N, c.F), R); };
    EXPECT_TRUE(fd_check(gu, dgu, loss));

    auto guf = to<float>(gu), Rf = to<float>(R);
    auto dguf = nans<float>(gu.size());
    swiglu_backward<float>(dguf.data(), Rf.data(), guf.data(), c.N, c.F);
    EXPECT_TRUE(close(dguf, dgu, 4));
  }
}

TEST(SwiGLU, SaturatedGatesStayFinite) {
  std::vector<float> gu = {-1000.f, -80.f, 0.f, 80.f, 1000.f, 1.f, 1.f, 1.f, 1.f, 1.f}, h(5), dh(5, 1.f), dgu(10);
  swiglu_forward<float>(h.data(), gu.data(), 1, 5);
  swiglu_backward<float>(dgu.data(), dh.data(), gu.data(), 1, 5);
  for (float v : h) EXPECT_TRUE(std::isfinite(v));
  for (float v : dgu) EXPECT_TRUE(std::isfinite(v));
  EXPECT_EQ(h[0], 0.f);
  EXPECT_EQ(h[4], 1000.f);
  EXPECT_EQ(dgu[4], 1.f);  // silu'(g) -> 1 for large g
}
