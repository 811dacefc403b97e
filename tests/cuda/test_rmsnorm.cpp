// rmsnorm_{forward,residual_forward,backward} against mop::cpu::rmsnorm_* (fp64 math, fp32
// results) on the same bf16-representable inputs.
// Tolerances:
//  - bf16 outputs (y, dx): |got - ref| <= 2 kBf16Eps |ref| + 1e-5: one rounding to bf16 plus fp32
//    evaluation error that may move it by one more half-step; 1e-5 absorbs fp32 cancellation in
//    w dy - x c for O(1) terms.
//  - rstd (fp32): 1e-5 relative: fp32 sum of D exact squares vs the fp64 reference.
//  - dw (fp32, accumulated onto a non-zero start): 1e-4 x max |dw_ref| absolute (fp32 sums over N
//    rows of O(1) products).
//  - resid_out: exact (bf16(resid + x) is computed the same way on both sides).
#include "ops/cpu/rmsnorm.h"
#include "ops/cuda/rmsnorm.h"

#include <algorithm>
#include <cstdio>

#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;

namespace {

constexpr float kEps = 1e-5f;
constexpr double kRtol = 2 * kBf16Eps, kAtol = 1e-5;
const int kNs[] = {1, 7, 37, 300};
const int kDs[] = {5, 64, 127, 1024, 2048};

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::abs(x)));
  return m;
}
std::vector<float> make_w(int D, uint64_t seed) {
  std::vector<float> w = random_bf16_values(D, seed, 0.25f);
  for (auto& x : w) x = round_bf16(1.f + x);
  return w;
}
// offset elements of padding in front, to misalign device pointers and force the scalar path.
std::vector<bf16> padded(const std::vector<float>& v, size_t offset) {
  std::vector<float> p(offset, 0.f);
  p.insert(p.end(), v.begin(), v.end());
  return to_bf16(p);
}
std::vector<float> unpadded(const DeviceArray<bf16>& a, size_t offset) {
  std::vector<float> v = to_f32(a.download());
  return std::vector<float>(v.begin() + offset, v.end());
}

void check_forward(int N, int D, size_t off) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " D=" << D << " offset=" << off);
  const std::vector<float> x = random_bf16_values(size_t(N) * D, N * 1000 + D, 2.f), w = make_w(D, D);
  std::vector<float> y_ref(x.size()), rstd_ref(N);
  cpu::rmsnorm_forward<float>(y_ref.data(), rstd_ref.data(), x.data(), w.data(), N, D, kEps);
  DeviceArray<bf16> d_x(padded(x, off)), d_w(padded(w, off)), d_y(off + x.size());
  DeviceArray<float> d_rstd(N);
  cuda::rmsnorm_forward(d_y.data() + off, d_rstd.data(), d_x.data() + off, d_w.data() + off, N, D, kEps, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close(unpadded(d_y, off), y_ref, kRtol, kAtol, "y");
  expect_close(d_rstd.download(), rstd_ref, 1e-5, 0, "rstd");
}

// in_place: resid_out is the resid buffer itself.
void check_residual_forward(int N, int D, bool in_place) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " D=" << D << " in_place=" << in_place);
  const std::vector<float> resid = random_bf16_values(size_t(N) * D, N + D, 2.f);
  const std::vector<float> x = random_bf16_values(size_t(N) * D, N + 3 * D), w = make_w(D, D + 1);
  std::vector<float> r(x.size()), y_ref(x.size()), rstd_ref(N);
  for (size_t i = 0; i < r.size(); ++i) r[i] = round_bf16(resid[i] + x[i]);
  cpu::rmsnorm_forward<float>(y_ref.data(), rstd_ref.data(), r.data(), w.data(), N, D, kEps);
  DeviceArray<bf16> d_resid(to_bf16(resid)), d_x(to_bf16(x)), d_w(to_bf16(w)), d_y(x.size()), d_out(x.size());
  DeviceArray<float> d_rstd(N);
  bf16* out = in_place ? d_resid.data() : d_out.data();
  cuda::rmsnorm_residual_forward(out, d_y.data(), d_rstd.data(), d_resid.data(), d_x.data(), d_w.data(), N, D, kEps,
                                 nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close(to_f32((in_place ? d_resid : d_out).download()), r, 0, 0, "resid_out");
  expect_close(to_f32(d_y.download()), y_ref, kRtol, kAtol, "y");
  expect_close(d_rstd.download(), rstd_ref, 1e-5, 0, "rstd");
}

struct Backward {
  std::vector<float> dx, dw;
};
// dw starts from dw0 (non-zero) to check accumulation; rstd comes from the CPU forward.
Backward gpu_backward(const std::vector<float>& dy, const std::vector<float>& x, const std::vector<float>& w,
                      const std::vector<float>& rstd, const std::vector<float>& dw0, int N, int D, size_t off) {
  DeviceArray<bf16> d_dy(padded(dy, off)), d_x(padded(x, off)), d_w(padded(w, off)), d_dx(off + dy.size());
  DeviceArray<float> d_rstd(rstd), d_dw(dw0), scratch(cuda::rmsnorm_backward_scratch_floats(N, D));
  cuda::rmsnorm_backward(d_dx.data() + off, d_dw.data(), d_dy.data() + off, d_x.data() + off, d_w.data() + off,
                         d_rstd.data(), N, D, scratch.data(), nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {unpadded(d_dx, off), d_dw.download()};
}

void check_backward(int N, int D, size_t off) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " D=" << D << " offset=" << off);
  const std::vector<float> x = random_bf16_values(size_t(N) * D, N * 77 + D, 2.f), w = make_w(D, D + 5);
  const std::vector<float> dy = random_bf16_values(x.size(), N * 91 + D), dw0 = random_bf16_values(D, D, 3.f);
  std::vector<float> y(x.size()), rstd(N), dx_ref(x.size()), dw_ref = dw0;
  cpu::rmsnorm_forward<float>(y.data(), rstd.data(), x.data(), w.data(), N, D, kEps);
  cpu::rmsnorm_backward<float>(dx_ref.data(), dw_ref.data(), dy.data(), x.data(), w.data(), rstd.data(), N, D);
  const Backward got = gpu_backward(dy, x, w, rstd, dw0, N, D, off);
  expect_close(got.dx, dx_ref, kRtol, kAtol, "dx");
  expect_close(got.dw, dw_ref, 0, 1e-4 * max_abs(dw_ref), "dw");
}

}  // namespace

TEST(CudaRmsNorm, ForwardMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (int N : kNs)
    for (int D : kDs) check_forward(N, D, 0);
  check_forward(37, 64, 1);  // misaligned: scalar path with D % 8 == 0
  check_forward(5000, 128, 0);
}

TEST(CudaRmsNorm, ResidualForwardMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (int N : {1, 7, 300})
    for (int D : {5, 127, 2048}) {
      check_residual_forward(N, D, false);
      check_residual_forward(N, D, true);
    }
}

TEST(CudaRmsNorm, BackwardMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (int N : kNs)
    for (int D : kDs) check_backward(N, D, 0);
  check_backward(37, 64, 1);
  check_backward(4099, 64, 0);  // more rows than blocks: several rows per block
  check_backward(3000, 127, 0);
  check_backward(7, 16384, 0);  // 64 KiB of dw accumulators: opts in to more shared memory
  check_backward(7, 16383, 0);
}

TEST(CudaRmsNorm, Deterministic) {
  MOP_REQUIRE_GPU();
  for (int D : {127, 1024}) {
    const int N = 4099;
    const std::vector<float> x = random_bf16_values(size_t(N) * D, 1, 2.f), w = make_w(D, 2);
    const std::vector<float> dy = random_bf16_values(x.size(), 3), dw0 = random_bf16_values(D, 4);
    std::vector<float> y(x.size()), rstd(N);
    cpu::rmsnorm_forward<float>(y.data(), rstd.data(), x.data(), w.data(), N, D, kEps);
    const Backward a = gpu_backward(dy, x, w, rstd, dw0, N, D, 0), b = gpu_backward(dy, x, w, rstd, dw0, N, D, 0);
    EXPECT_EQ(std::memcmp(a.dx.data(), b.dx.data(), a.dx.size() * 4), 0) << "dx D=" << D;
    EXPECT_EQ(std::memcmp(a.dw.data(), b.dw.data(), a.dw.size() * 4), 0) << "dw D=" << D;
  }
}

// Informative only: prints the achieved bandwidth, never fails on speed.
TEST(CudaRmsNorm, Bandwidth) {
  MOP_REQUIRE_GPU();
  const int N = 16384, D = 2048;
  const size_t nd = size_t(N) * D;
  DeviceArray<bf16> x(nd), y(nd), r(nd), dy(nd), dx(nd), w(to_bf16(std::vector<float>(D, 1.f)));
  DeviceArray<float> rstd(std::vector<float>(N, 1.f)), dw(D), scratch(cuda::rmsnorm_backward_scratch_floats(N, D));
  const double fwd =
      median_ms([&] { cuda::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, kEps, nullptr); });
  const double res = median_ms([&] {
    cuda::rmsnorm_residual_forward(r.data(), y.data(), rstd.data(), r.data(), x.data(), w.data(), N, D, kEps, nullptr);
  });
  const double bwd = median_ms([&] {
    cuda::rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), N, D, scratch.data(),
                           nullptr);
  });
  // Bytes: forward reads x, writes y; residual reads resid, x, writes resid_out, y; backward
  // reads dy, x, writes dx (the small w, rstd and scratch traffic not counted).
  const double b = 2.0 * nd;
  std::printf("[rmsnorm N=%d D=%d] forward %.3f ms %.0f GB/s, residual %.3f ms %.0f GB/s, backward %.3f ms %.0f GB/s\n",
              N, D, fwd, 2 * b / (fwd * 1e6), res, 4 * b / (res * 1e6), bwd, 3 * b / (bwd * 1e6));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
