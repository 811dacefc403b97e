// swiglu_forward / swiglu_backward against mop::cpu::swiglu_* (fp64 math, fp32 result) on the
// same bf16-representable inputs.
// Tolerance: outputs are bf16, so |got - ref| <= 2 kBf16Eps |ref| + atol: one rounding to bf16
// (<= kBf16Eps relative) plus fp32 evaluation error (a few 2^-24) that can move the rounding by
// at most one more half-step. atol (1e-6 forward, 1e-5 backward) covers fp32 cancellation in
// 1 + g (1 - s) near g = -1.28 and the fp32 underflow of silu for very negative g.
#include "ops/cpu/swiglu.h"
#include "ops/cuda/swiglu.h"

#include <cstdio>

#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;

namespace {

constexpr double kRtol = 2 * kBf16Eps;
const int kNs[] = {1, 7, 37, 300};
const int kFs[] = {5, 64, 127, 1024, 2048};

// gu in [-6, 6] with saturating values planted: silu(-100) underflows, silu(100) = 100.
std::vector<float> make_gu(int N, int F, uint64_t seed) {
  std::vector<float> gu = random_bf16_values(size_t(N) * 2 * F, seed, 6.f);
  const float big[] = {-100.f, 100.f, 0.f, -1.28125f};
  for (int i = 0; i < 4 && i < F; ++i) gu[i] = big[i];
  return gu;
}

// offset > 0 shifts every pointer by that many elements to force the scalar path.
void check(int N, int F, size_t offset) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " F=" << F << " offset=" << offset);
  const std::vector<float> gu = make_gu(N, F, 100 * N + F), dh = random_bf16_values(size_t(N) * F, N + 7 * F);
  std::vector<float> h_ref(size_t(N) * F), dgu_ref(size_t(N) * 2 * F);
  cpu::swiglu_forward<float>(h_ref.data(), gu.data(), N, F);
  cpu::swiglu_backward<float>(dgu_ref.data(), dh.data(), gu.data(), N, F);

  auto pad = [&](const std::vector<float>& v) {
    std::vector<float> p(offset, 0.f);
    p.insert(p.end(), v.begin(), v.end());
    return to_bf16(p);
  };
  auto unpad = [&](const DeviceArray<bf16>& a) {
    std::vector<float> v = to_f32(a.download());
    return std::vector<float>(v.begin() + offset, v.end());
  };
  DeviceArray<bf16> d_gu(pad(gu)), d_dh(pad(dh)), d_h(offset + h_ref.size()), d_dgu(offset + dgu_ref.size());
  cuda::swiglu_forward(d_h.data() + offset, d_gu.data() + offset, N, F, nullptr);
  cuda::swiglu_backward(d_dgu.data() + offset, d_dh.data() + offset, d_gu.data() + offset, N, F, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close(unpad(d_h), h_ref, kRtol, 1e-6, "h");
  expect_close(unpad(d_dgu), dgu_ref, kRtol, 1e-5, "dgu");
}

}  // namespace

TEST(CudaSwiglu, MatchesCpuReference) {
  MOP_REQUIRE_GPU();
  for (int N : kNs)
    for (int F : kFs) check(N, F, 0);
}

TEST(CudaSwiglu, MisalignedPointersUseTheScalarPath) {
  MOP_REQUIRE_GPU();
  check(7, 64, 1);
  check(37, 1024, 3);
}

// Informative only: prints the achieved bandwidth, never fails on speed.
TEST(CudaSwiglu, Bandwidth) {
  MOP_REQUIRE_GPU();
  const int N = 16384, F = 2048;
  const size_t nf = size_t(N) * F;
  DeviceArray<bf16> gu(2 * nf), h(nf), dh(nf), dgu(2 * nf);
  const double fwd = median_ms([&] { cuda::swiglu_forward(h.data(), gu.data(), N, F, nullptr); });
  const double bwd = median_ms([&] { cuda::swiglu_backward(dgu.data(), dh.data(), gu.data(), N, F, nullptr); });
  // Bytes moved: forward reads g, u and writes h; backward reads g, u, dh and writes dg, du.
  std::printf("[swiglu N=%d F=%d] forward %.3f ms %.0f GB/s, backward %.3f ms %.0f GB/s\n", N, F, fwd,
              6.0 * nf / (fwd * 1e6), bwd, 10.0 * nf / (bwd * 1e6));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
