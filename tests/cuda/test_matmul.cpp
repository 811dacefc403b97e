// Dense cuBLASLt GEMMs against the CPU reference (double, on the same bf16-representable inputs).
//
// Tolerances. The inputs are exact bf16 values, so every product is exact in fp32 and only the fp32
// summation order differs from the reference (relative error ~ K * 2^-24, far below what is checked).
//  - bf16 outputs (y, dx): the final rounding to bf16 is at most half an ulp, 2^-9 relative; we allow
//    rtol = 2 * kBf16Eps, plus atol = 1e-3 * sqrt(K) * (typical |term| = scale^2) for sums that
//    cancel to near zero, where the relative bound means nothing.
//  - fp32 outputs (router logits, dw): rtol = 1e-3, atol = 1e-4 * sqrt(K) * scale^2; only the order
//    of fp32 additions differs.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "core/error.h"
#include "cuda_test_util.h"
#include "ops/cpu/matmul.h"
#include "ops/cuda/blas.h"
#include "ops/cuda/matmul.h"

using namespace mop;
using namespace mop::test;

namespace {

std::vector<double> to_f64(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<float> to_f32d(const std::vector<double>& v) { return {v.begin(), v.end()}; }
double bf16_atol(int K) { return 1e-3 * std::sqrt(double(K)); }
double f32_atol(int K) { return 1e-4 * std::sqrt(double(K)); }

struct Shape {
  int N, I, O;
};
std::vector<Shape> odd_shapes() {
  std::vector<Shape> s;
  for (int N : {1, 17, 333})
    for (auto [I, O] : {std::pair{24, 136}, std::pair{136, 1000}, std::pair{1000, 24}}) s.push_back({N, I, O});
  return s;
}
std::string name(const Shape& s) { return fmt::format("N={} I={} O={}", s.N, s.I, s.O); }

}  // namespace

TEST(CudaMatmul, ForwardMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (const Shape& s : odd_shapes()) {
    const auto x = random_bf16_values(size_t(s.N) * s.I, 1 + s.N * 7 + s.I), w = random_bf16_values(size_t(s.O) * s.I, 2 + s.O);
    std::vector<double> ref(size_t(s.N) * s.O);
    cpu::matmul_forward<double>(ref.data(), to_f64(x).data(), to_f64(w).data(), s.N, s.I, s.O);
    DeviceArray<bf16> dx(to_bf16(x)), dw(to_bf16(w)), dy(size_t(s.N) * s.O);
    DeviceArray<float> dy32(size_t(s.N) * s.O);
    cuda::matmul_forward(dy.data(), dx.data(), dw.data(), s.N, s.I, s.O, nullptr);
    cuda::matmul_forward_f32out(dy32.data(), dx.data(), dw.data(), s.N, s.I, s.O, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close(to_f32(dy.download()), to_f32d(ref), 2 * kBf16Eps, bf16_atol(s.I), "y bf16 " + name(s));
    expect_close(dy32.download(), to_f32d(ref), 1e-3, f32_atol(s.I), "y f32 " + name(s));
  }
}

TEST(CudaMatmul, BackwardMatchesCpuAndAccumulatesDw) {
  MOP_REQUIRE_GPU();
  for (const Shape& s : odd_shapes()) {
    const auto x = random_bf16_values(size_t(s.N) * s.I, 3 + s.N), w = random_bf16_values(size_t(s.O) * s.I, 4 + s.I),
               dy = random_bf16_values(size_t(s.N) * s.O, 5 + s.O);
    const auto dw0 = random_bf16_values(size_t(s.O) * s.I, 6, 4.f);  // non-zero: dw must accumulate
    std::vector<double> ref_dx(size_t(s.N) * s.I), ref_dw = to_f64(dw0);
    cpu::matmul_backward<double>(ref_dx.data(), ref_dw.data(), to_f64(dy).data(), to_f64(x).data(), to_f64(w).data(),
                                 s.N, s.I, s.O);
    DeviceArray<bf16> d_x(to_bf16(x)), d_w(to_bf16(w)), d_dy(to_bf16(dy)), d_dx(size_t(s.N) * s.I);
    DeviceArray<float> d_dw(dw0);
    cuda::matmul_backward(d_dx.data(), d_dw.data(), d_dy.data(), d_x.data(), d_w.data(), s.N, s.I, s.O, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close(to_f32(d_dx.download()), to_f32d(ref_dx), 2 * kBf16Eps, bf16_atol(s.O), "dx " + name(s));
    expect_close(d_dw.download(), to_f32d(ref_dw), 1e-3, f32_atol(s.N), "dw " + name(s));

    // Null outputs are skipped: dx only, then dw only, give the same values.
    DeviceArray<bf16> d_dx2(size_t(s.N) * s.I);
    DeviceArray<float> d_dw2(dw0);
    cuda::matmul_backward(d_dx2.data(), nullptr, d_dy.data(), d_x.data(), d_w.data(), s.N, s.I, s.O, nullptr);
    cuda::matmul_backward(nullptr, d_dw2.data(), d_dy.data(), d_x.data(), d_w.data(), s.N, s.I, s.O, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(to_f32(d_dx2.download()), to_f32(d_dx.download())) << name(s);
    EXPECT_EQ(d_dw2.download(), d_dw.download()) << name(s);
  }
}

TEST(CudaMatmul, EmptyBatchIsANoOp) {
  MOP_REQUIRE_GPU();
  const std::vector<float> dw0(24 * 16, 1.5f);
  DeviceArray<bf16> x(1), w(24 * 16), y(1), dy(1), dx(1);
  DeviceArray<float> dw(dw0);
  cuda::matmul_forward(y.data(), x.data(), w.data(), 0, 16, 24, nullptr);
  cuda::matmul_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), 0, 16, 24, nullptr);
  EXPECT_EQ(dw.download(), dw0);
  EXPECT_THROW(cuda::matmul_forward(y.data(), x.data(), w.data(), -1, 16, 24, nullptr), Error);
}

// Router-like shapes (small O, long N) are where split-K is tempting; two runs must give the same bits.
TEST(CudaMatmul, DeterministicRunToRun) {
  MOP_REQUIRE_GPU();
  const int N = 8192, I = 2048, O = 64;
  const auto x = random_bf16_values(size_t(N) * I, 11), w = random_bf16_values(size_t(O) * I, 12),
             dy = random_bf16_values(size_t(N) * O, 13);
  DeviceArray<bf16> d_x(to_bf16(x)), d_w(to_bf16(w)), d_dy(to_bf16(dy));
  std::vector<std::vector<float>> ys, dxs, dws;
  for (int run = 0; run < 2; ++run) {
    DeviceArray<float> y(size_t(N) * O), dw(size_t(O) * I);
    DeviceArray<bf16> dx(size_t(N) * I);
    cuda::matmul_forward_f32out(y.data(), d_x.data(), d_w.data(), N, I, O, nullptr);
    cuda::matmul_backward(dx.data(), dw.data(), d_dy.data(), d_x.data(), d_w.data(), N, I, O, nullptr);
    ys.push_back(y.download()), dxs.push_back(to_f32(dx.download())), dws.push_back(dw.download());
  }
  EXPECT_EQ(ys[0], ys[1]);
  EXPECT_EQ(dxs[0], dxs[1]);
  EXPECT_EQ(dws[0], dws[1]);
}

TEST(CudaMatmul, AlgorithmIsChosenOncePerShape) {
  MOP_REQUIRE_GPU();
  DeviceArray<bf16> x(33 * 40), w(72 * 40), y(33 * 72);
  cuda::matmul_forward(y.data(), x.data(), w.data(), 33, 40, 72, nullptr);
  const size_t n = cuda::blas_handle().cached_algorithms();
  for (int i = 0; i < 3; ++i) cuda::matmul_forward(y.data(), x.data(), w.data(), 33, 40, 72, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cuda::blas_handle().cached_algorithms(), n);
}

// Prints, never fails: dense bf16 GEMM throughput (H200 peak dense bf16 ~ 990 TFLOP/s; ~750-800 is good).
TEST(CudaMatmul, BenchmarkDense8192) {
  MOP_REQUIRE_GPU();
  const int n = 8192;
  DeviceArray<bf16> x(to_bf16(random_bf16_values(size_t(n) * n, 21))), w(to_bf16(random_bf16_values(size_t(n) * n, 22))),
      y(size_t(n) * n);
  const double ms = median_ms([&] { cuda::matmul_forward(y.data(), x.data(), w.data(), n, n, n, nullptr); });
  const double tflops = 2.0 * n * n * n / (ms * 1e-3) / 1e12;
  std::printf("[bench] dense bf16 GEMM %dx%dx%d: %.3f ms, %.0f TFLOP/s\n", n, n, n, ms, tflops);
}
