#include "ops/cpu/grouped_matmul.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  std::vector<int32_t> counts;  // rows per expert
  int I, O;
};
const Case kCases[] = {{{3, 0, 5, 0}, 17, 9}, {{7}, 5, 3}, {{0, 0, 0}, 4, 3}, {{1, 4, 0, 2, 9}, 16, 5}};

std::vector<int32_t> offsets_of(const std::vector<int32_t>& counts) {
  std::vector<int32_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

Vec ref_forward(const Vec& x, const Vec& w, const std::vector<int32_t>& off, int I, int O) {
  const int E = int(off.size()) - 1;
  Vec y(static_cast<size_t>(off[E]) * O, 0.0);
  for (int e = 0; e < E; ++e)
    for (int m = off[e]; m < off[e + 1]; ++m)
      for (int o = 0; o < O; ++o)
        for (int i = 0; i < I; ++i) y[m * O + o] += x[m * I + i] * w[(size_t(e) * O + o) * I + i];
  return y;
}

}  // namespace

TEST(GroupedMatmul, ForwardMatchesReference) {
  for (const Case& c : kCases) {
    const auto off = offsets_of(c.counts);
    const int E = int(c.counts.size()), M = off[E];
    SCOPED_TRACE(::testing::Message() << "E=" << E << " M=" << M << " I=" << c.I << " O=" << c.O);
    Rand r(M * 10 + E);
    Vec x = r.normals(size_t(M) * c.I), w = r.normals(size_t(E) * c.O * c.I);
    Vec ref = ref_forward(x, w, off, c.I, c.O);
    auto run = [&]<class T>(T) {
      auto xt = to<T>(x), wt = to<T>(w);
      auto y = nans<T>(ref.size());
      grouped_matmul_forward<T>(y.data(), xt.data(), wt.data(), off.data(), E, c.I, c.O);
      EXPECT_TRUE(close(y, ref, c.I));
    };
    run(double{});
    run(float{});
  }
}

TEST(GroupedMatmul, BackwardMatchesFiniteDifferencesAndKeepsEmptyExperts) {
  for (const Case& c : kCases) {
    const auto off = offsets_of(c.counts);
    const int E = int(c.counts.size()), M = off[E];
    SCOPED_TRACE(::testing::Message() << "E=" << E << " M=" << M << " I=" << c.I << " O=" << c.O);
    Rand r(M * 17 + E);
    Vec x = r.normals(size_t(M) * c.I), w = r.normals(size_t(E) * c.O * c.I), R = r.normals(size_t(M) * c.O);
    Vec g0 = r.normals(w.size());
    Vec dx(x.size(), NAN), dw = g0;
    grouped_matmul_backward<double>(dx.data(), dw.data(), R.data(), x.data(), w.data(), off.data(), E, c.I, c.O);
    auto loss = [&] { return dot(ref_forward(x, w, off, c.I, c.O), R); };
    EXPECT_TRUE(fd_check(x, dx, loss)) << "dx";
    EXPECT_TRUE(fd_check(w, sub(dw, g0), loss)) << "dw";
    for (int e = 0; e < E; ++e) {
      if (c.counts[e] != 0) continue;
      for (size_t i = size_t(e) * c.O * c.I; i < size_t(e + 1) * c.O * c.I; ++i) {
        ASSERT_EQ(dw[i], g0[i]) << "empty expert " << e << " gradient changed";
      }
    }

    auto xf = to<float>(x), wf = to<float>(w), Rf = to<float>(R);
    auto dxf = nans<float>(x.size());
    auto dwf = to<float>(g0);
    grouped_matmul_backward<float>(dxf.data(), dwf.data(), Rf.data(), xf.data(), wf.data(), off.data(), E, c.I, c.O);
    EXPECT_TRUE(close(dxf, dx, c.O));
    EXPECT_TRUE(close(dwf, dw, M));

    auto dwf2 = to<float>(g0);  // null dx: dw alone, identical
    grouped_matmul_backward<float>(nullptr, dwf2.data(), Rf.data(), xf.data(), wf.data(), off.data(), E, c.I, c.O);
    EXPECT_TRUE(same_bits(dwf, dwf2));
  }
}

TEST(GroupedMatmul, DecreasingOffsetsThrow) {
  std::vector<int32_t> off = {0, 4, 2};
  Vec x(4 * 3), w(2 * 2 * 3), y(4 * 2);
  EXPECT_TRUE(throws_naming(
      [&] { grouped_matmul_forward<double>(y.data(), x.data(), w.data(), off.data(), 2, 3, 2); }, {"expert 1"}));
}
