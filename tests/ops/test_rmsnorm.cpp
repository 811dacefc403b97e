#include "ops/cpu/rmsnorm.h"

#include "op_check.h"

using namespace mop::cpu;
using namespace opcheck;

namespace {

struct Case {
  int N, D;
};
const Case kCases[] = {{1, 5}, {7, 17}, {33, 64}, {4, 1}};
constexpr double kEps = 1e-5;

void ref_forward(Vec& y, Vec& rstd, const Vec& x, const Vec& w, int N, int D) {
  y.assign(size_t(N) * D, 0), rstd.assign(N, 0);
  for (int n = 0; n < N; ++n) {
    double ms = 0;
    for (int d = 0; d < D; ++d) ms += x[n * D + d] * x[n * D + d];
    rstd[n] = 1 / std::sqrt(ms / D + kEps);
    for (int d = 0; d < D; ++d) y[n * D + d] = x[n * D + d] * rstd[n] * w[d];
  }
}

struct Inputs {
  Vec x, w, R, g0;
};
Inputs make(const Case& c) {
  Rand r(c.N * 1000 + c.D);
  Inputs in{r.normals(size_t(c.N) * c.D), r.normals(c.D, 0.2), r.normals(size_t(c.N) * c.D), r.normals(c.D)};
  for (auto& w : in.w) w += 1.0;
  return in;
}

template <class T> void run_backward(std::vector<T>& dx, std::vector<T>& dw, const Inputs& in, int N, int D) {
  auto x = to<T>(in.x), w = to<T>(in.w), R = to<T>(in.R);
  std::vector<T> y(x.size()), rstd(N);
  rmsnorm_forward<T>(y.data(), rstd.data(), x.data(), w.data(), N, D, T(kEps));
  dx = nans<T>(x.size());
  dw = to<T>(in.g0);
  rmsnorm_backward<T>(dx.data(), dw.data(), R.data(), x.data(), w.data(), rstd.data(), N, D);
}

}  // namespace

TEST(RmsNorm, ForwardMatchesReference) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " D=" << c.D);
    Inputs in = make(c);
    Vec y, rstd;
    ref_forward(y, rstd, in.x, in.w, c.N, c.D);
    auto run = [&]<class T>(T) {
      auto x = to<T>(in.x), w = to<T>(in.w);
      auto yt = nans<T>(x.size()), rt = nans<T>(c.N);
      rmsnorm_forward<T>(yt.data(), rt.data(), x.data(), w.data(), c.N, c.D, T(kEps));
      EXPECT_TRUE(close(yt, y, c.D));
      EXPECT_TRUE(close(rt, rstd, c.D));
    };
    run(double{});
    run(float{});
  }
}

TEST(RmsNorm, BackwardMatchesFiniteDifferences) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.N << " D=" << c.D);
    Inputs in = make(c);
    std::vector<double> dx, dw;
    run_backward(dx, dw, in, c.N, c.D);
    auto loss = [&] {
      Vec y, rstd;
      ref_forward(y, rstd, in.x, in.w, c.N, c.D);
      return dot(y, in.R);
    };
    EXPECT_TRUE(fd_check(in.x, dx, loss)) << "dx";
    EXPECT_TRUE(fd_check(in.w, sub(dw, in.g0), loss)) << "dw (accumulated onto g0)";

    std::vector<float> dxf, dwf;
    run_backward(dxf, dwf, in, c.N, c.D);
    EXPECT_TRUE(close(dxf, dx, c.D));
    EXPECT_TRUE(close(dwf, dw, c.N * c.D));
  }
}

TEST(RmsNorm, BackwardDeterministicAcrossRunsAndThreadCounts) {
  Inputs in = make({300, 130});
  std::vector<float> dx1, dw1, dx2, dw2, dx3, dw3;
  run_backward(dx1, dw1, in, 300, 130);
  run_backward(dx2, dw2, in, 300, 130);
  with_threads(1, [&] { run_backward(dx3, dw3, in, 300, 130); });
  EXPECT_TRUE(same_bits(dx1, dx2));
  EXPECT_TRUE(same_bits(dw1, dw2));
  EXPECT_TRUE(same_bits(dx1, dx3));
  EXPECT_TRUE(same_bits(dw1, dw3));
}
