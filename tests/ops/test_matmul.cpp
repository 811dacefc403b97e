#include "ops/cpu/matmul.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  int N, I, O;
};
const Case kCases[] = {{1, 5, 3}, {7, 17, 9}, {33, 64, 17}, {5, 1, 1}};

Vec ref_forward(const Vec& x, const Vec& w, int N, int I, int O) {
  Vec y(size_t(N) * O, 0.0);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < O; ++o)
      for (int i = 0; i < I; ++i) y[n * O + o] += x[n * I + i] * w[o * I + i];
  return y;
}

}  // namespace

TEST(Matmul, ForwardMatchesReference) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " I=" << c.I << " O=" << c.O);
    Rand r(c.N + c.I * 100 + c.O);
    Vec x = r.normals(size_t(c.N) * c.I), w = r.normals(size_t(c.O) * c.I);
    Vec ref = ref_forward(x, w, c.N, c.I, c.O);
    auto run = [&]<class T>(T) {
      auto xt = to<T>(x), wt = to<T>(w);
      auto y = nans<T>(ref.size());
      matmul_forward<T>(y.data(), xt.data(), wt.data(), c.N, c.I, c.O);
      EXPECT_TRUE(close(y, ref, c.I));
    };
    run(double{});
    run(float{});
  }
}

TEST(Matmul, BackwardMatchesFiniteDifferences) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " I=" << c.I << " O=" << c.O);
    Rand r(c.N * 3 + c.I + c.O);
    Vec x = r.normals(size_t(c.N) * c.I), w = r.normals(size_t(c.O) * c.I), R = r.normals(size_t(c.N) * c.O);
    Vec g0 = r.normals(w.size());
    Vec dx(x.size(), NAN), dw = g0;
    matmul_backward<double>(dx.data(), dw.data(), R.data(), x.data(), w.data(), c.N, c.I, c.O);
    auto loss = [&] { return dot(ref_forward(x, w, c.N, c.I, c.O), R); };
    EXPECT_TRUE(fd_check(x, dx, loss)) << "dx";
    EXPECT_TRUE(fd_check(w, sub(dw, g0), loss)) << "dw";

    auto xf = to<float>(x), wf = to<float>(w), Rf = to<float>(R);
    auto dxf = nans<float>(x.size());
    auto dwf = to<float>(g0);
    matmul_backward<float>(dxf.data(), dwf.data(), Rf.data(), xf.data(), wf.data(), c.N, c.I, c.O);
    EXPECT_TRUE(close(dxf, dx, c.O));
    EXPECT_TRUE(close(dwf, dw, c.N));
  }
}

TEST(Matmul, NullGradientsAreSkipped) {
  const int N = 6, I = 5, O = 4;
  Rand r(11);
  Vec x = r.normals(N * I), w = r.normals(O * I), dy = r.normals(N * O);
  Vec dx(x.size(), NAN), dw(w.size(), 0.0);
  matmul_backward<double>(dx.data(), nullptr, dy.data(), x.data(), w.data(), N, I, O);
  for (double v : dx) EXPECT_FALSE(std::isnan(v));
  matmul_backward<double>(nullptr, dw.data(), dy.data(), x.data(), w.data(), N, I, O);
  Vec dx2(x.size()), dw2(w.size(), 0.0);
  matmul_backward<double>(dx2.data(), dw2.data(), dy.data(), x.data(), w.data(), N, I, O);
  EXPECT_TRUE(same_bits(dx, dx2));
  EXPECT_TRUE(same_bits(dw, dw2));
}

TEST(Matmul, EmptyShapes) {
  Vec w(3 * 5, 1.0), x, y;
  matmul_forward<double>(y.data(), x.data(), w.data(), 0, 5, 3);  // N = 0: nothing to do
  Vec dw = w;
  matmul_backward<double>(nullptr, dw.data(), y.data(), x.data(), w.data(), 0, 5, 3);
  EXPECT_TRUE(same_bits(dw, w));
  Vec y2(4 * 3, NAN), x2, w2;
  matmul_forward<double>(y2.data(), x2.data(), w2.data(), 4, 0, 3);  // empty reduction gives zeros
  for (double v : y2) EXPECT_EQ(v, 0.0);
}
