#include "ops/cpu/rope.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  int N, H, hd;
  double theta;
};
const Case kCases[] = {{1, 1, 8, 10000.0}, {7, 3, 16, 10000.0}, {33, 2, 6, 500000.0}, {5, 4, 2, 10.0}};

std::vector<int32_t> positions(Rand& r, int N) {
  auto pos = r.ints(N, 5000);  // large positions: angles far beyond 2 pi
  if (N > 0) pos[0] = 0;
  return pos;
}

Vec ref_forward(const Vec& x, const std::vector<int32_t>& pos, const Case& c) {
  Vec out(x.size());
  const int half = c.hd / 2;
  for (int n = 0; n < c.N; ++n)
    for (int h = 0; h < c.H; ++h)
      for (int i = 0; i < half; ++i) {
        // The angle exactly as the header defines it: at positions in the thousands any other
        // rounding of it moves the output by ~|pos| * eps, far above the rotation's own error.
        const double ang = pos[n] * std::pow(c.theta, -2.0 * i / c.hd);
        const size_t b = (size_t(n) * c.H + h) * c.hd;
        out[b + i] = x[b + i] * std::cos(ang) - x[b + i + half] * std::sin(ang);
        out[b + i + half] = x[b + i + half] * std::cos(ang) + x[b + i] * std::sin(ang);
      }
  return out;
}

}  // namespace

TEST(Rope, ForwardMatchesReferenceAndMayAlias) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " H=" << c.H << " hd=" << c.hd);
    Rand r(c.N * 5 + c.hd);
    auto pos = positions(r, c.N);
    Vec x = r.normals(size_t(c.N) * c.H * c.hd);
    Vec ref = ref_forward(x, pos, c);
    auto run = [&]<class T>(T) {
      auto xt = to<T>(x);
      auto out = nans<T>(x.size());
      rope_forward<T>(out.data(), xt.data(), pos.data(), c.N, c.H, c.hd, c.theta);
      EXPECT_TRUE(close(out, ref, 2));
      rope_forward<T>(xt.data(), xt.data(), pos.data(), c.N, c.H, c.hd, c.theta);  // in place
      EXPECT_TRUE(same_bits(xt, out));
    };
    run(double{});
    run(float{});
  }
}

TEST(Rope, BackwardIsTransposeAndMatchesFiniteDifferences) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " H=" << c.H << " hd=" << c.hd);
    Rand r(c.N * 9 + c.hd);
    auto pos = positions(r, c.N);
    Vec x = r.normals(size_t(c.N) * c.H * c.hd), R = r.normals(x.size());
    Vec dx(x.size(), NAN);
    rope_backward<double>(dx.data(), R.data(), pos.data(), c.N, c.H, c.hd, c.theta);
    auto loss = [&] { return dot(ref_forward(x, pos, c), R); };
    EXPECT_TRUE(fd_check(x, dx, loss));

    auto Rf = to<float>(R);
    auto dxf = nans<float>(x.size());
    rope_backward<float>(dxf.data(), Rf.data(), pos.data(), c.N, c.H, c.hd, c.theta);
    EXPECT_TRUE(close(dxf, dx, 2));
    rope_backward<float>(Rf.data(), Rf.data(), pos.data(), c.N, c.H, c.hd, c.theta);  // in place
    EXPECT_TRUE(same_bits(Rf, dxf));

    Vec y(x.size()), back(x.size());  // a rotation: backward undoes forward
    rope_forward<double>(y.data(), x.data(), pos.data(), c.N, c.H, c.hd, c.theta);
    rope_backward<double>(back.data(), y.data(), pos.data(), c.N, c.H, c.hd, c.theta);
    EXPECT_TRUE(close(back, x, 4));
  }
}

TEST(Rope, OddHeadDimThrows) {
  Vec x(5), out(5);
  std::vector<int32_t> pos = {0};
  EXPECT_TRUE(throws_naming([&] { rope_forward<double>(out.data(), x.data(), pos.data(), 1, 1, 5, 1e4); }, {"5"}));
}
