// Grouped expert GEMMs against the CPU reference (double, on the same bf16-representable inputs).
// Tolerances as in test_matmul.cpp: bf16 outputs (y, dx) rtol = 2 * kBf16Eps (final bf16 rounding)
// plus atol = 1e-3 * sqrt(K) for cancelling sums; fp32 dw rtol = 1e-3 plus atol = 1e-4 * sqrt(rows)
// (exact products, only the fp32 summation order differs).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "core/error.h"
#include "cuda_test_util.h"
#include "ops/cpu/grouped_matmul.h"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/matmul.h"

using namespace mop;
using namespace mop::test;

namespace {

std::vector<double> to_f64(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<float> to_f32d(const std::vector<double>& v) { return {v.begin(), v.end()}; }

std::vector<int32_t> offsets_of(const std::vector<int>& counts) {
  std::vector<int32_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

struct Outputs {
  std::vector<float> y, dx, dw;
};

// Runs forward and backward on the GPU; dw starts from dw0.
Outputs run_gpu(const std::vector<int32_t>& off, const std::vector<float>& x, const std::vector<float>& w,
                const std::vector<float>& dy, const std::vector<float>& dw0, int E, int I, int O) {
  const int M = off[E];
  DeviceArray<bf16> d_x(to_bf16(x)), d_w(to_bf16(w)), d_dy(to_bf16(dy)), d_y(size_t(M) * O), d_dx(size_t(M) * I);
  DeviceArray<float> d_dw(dw0);
  DeviceArray<int32_t> d_off(off);
  cuda::grouped_matmul_forward(d_y.data(), d_x.data(), d_w.data(), d_off.data(), off.data(), E, I, O, nullptr);
  cuda::grouped_matmul_backward(d_dx.data(), d_dw.data(), d_dy.data(), d_x.data(), d_w.data(), d_off.data(), off.data(),
                                E, I, O, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {to_f32(d_y.download()), to_f32(d_dx.download()), d_dw.download()};
}

void check_against_cpu(const std::vector<int>& counts, int I, int O, uint64_t seed, const std::string& what) {
  const int E = int(counts.size());
  const auto off = offsets_of(counts);
  const int M = off[E];
  const int max_rows = *std::max_element(counts.begin(), counts.end());
  const auto x = random_bf16_values(size_t(M) * I, seed), w = random_bf16_values(size_t(E) * O * I, seed + 1),
             dy = random_bf16_values(size_t(M) * O, seed + 2), dw0 = random_bf16_values(size_t(E) * O * I, seed + 3, 4.f);
  std::vector<double> ref_y(size_t(M) * O), ref_dx(size_t(M) * I), ref_dw = to_f64(dw0);
  cpu::grouped_matmul_forward<double>(ref_y.data(), to_f64(x).data(), to_f64(w).data(), off.data(), E, I, O);
  cpu::grouped_matmul_backward<double>(ref_dx.data(), ref_dw.data(), to_f64(dy).data(), to_f64(x).data(),
                                       to_f64(w).data(), off.data(), E, I, O);
  const Outputs got = run_gpu(off, x, w, dy, dw0, E, I, O);
  const std::string tag = fmt::format("{} E={} I={} O={} M={}", what, E, I, O, M);
  expect_close(got.y, to_f32d(ref_y), 2 * kBf16Eps, 1e-3 * std::sqrt(double(I)), "y " + tag);
  expect_close(got.dx, to_f32d(ref_dx), 2 * kBf16Eps, 1e-3 * std::sqrt(double(O)), "dx " + tag);
  // Experts with no rows keep dw0 exactly (the reference leaves them unchanged too).
  expect_close(got.dw, to_f32d(ref_dw), 1e-3, 1e-4 * std::sqrt(double(std::max(max_rows, 1))), "dw " + tag);
  for (int e = 0; e < E; ++e) {
    if (counts[e] != 0) continue;
    for (size_t i = size_t(e) * O * I; i < size_t(e + 1) * O * I; ++i) {
      ASSERT_EQ(got.dw[i], dw0[i]) << "dw of empty expert " << e << " changed, " << tag;
    }
  }
}

// Runs f once per grouped GEMM backend (the backend is process-wide; restored to cuBLAS after).
template <class F> void for_each_backend(F&& f) {
  for (const char* b : {"cublas", "cutlass"}) {
    cuda::set_grouped_gemm_backend(b);
    f(std::string(b));
  }
  cuda::set_grouped_gemm_backend("cutlass");  // back to the default
}

}  // namespace

TEST(CudaGroupedMatmul, UnevenCountsWithEmptyExperts) {
  MOP_REQUIRE_GPU();
  const std::vector<int> counts{5, 0, 17, 1, 0, 40, 3, 0};
  for_each_backend([&](const std::string& b) {
    for (auto [I, O] : {std::pair{24, 136}, std::pair{136, 1000}, std::pair{1000, 24}})
      check_against_cpu(counts, I, O, 100 + I, b + " uneven");
    // Not multiples of 8: the CUTLASS backend falls back to cuBLAS for these.
    check_against_cpu(counts, 20, 36, 150, b + " unaligned");
  });
}

TEST(CudaGroupedMatmul, AllRowsToOneExpert) {
  MOP_REQUIRE_GPU();
  for_each_backend([&](const std::string& b) {
    check_against_cpu({0, 0, 0, 0, 0, 333, 0, 0}, 136, 24, 200, b + " one expert");
    check_against_cpu({333, 0, 0, 0, 0, 0, 0, 0}, 24, 136, 201, b + " first expert");
    check_against_cpu({0, 0, 0, 0, 0, 0, 0, 17}, 1000, 136, 202, b + " last expert");
  });
}

TEST(CudaGroupedMatmul, SixtyFourExpertsRandomCounts) {
  MOP_REQUIRE_GPU();
  std::mt19937 g(7);
  std::vector<int> counts(64);
  for (auto& c : counts) c = (g() % 4 == 0) ? 0 : int(g() % 70);
  for_each_backend([&](const std::string& b) {
    check_against_cpu(counts, 136, 200, 300, b + " E=64");
    check_against_cpu(counts, 1000, 24, 301, b + " E=64");
  });
}

TEST(CudaGroupedMatmul, NoRowsIsANoOp) {
  MOP_REQUIRE_GPU();
  const int E = 4, I = 16, O = 8;
  const std::vector<int32_t> off(E + 1, 0);
  const std::vector<float> dw0(size_t(E) * O * I, 0.75f);
  DeviceArray<bf16> x(1), w(size_t(E) * O * I), y(1), dy(1), dx(1);
  DeviceArray<float> dw(dw0);
  DeviceArray<int32_t> d_off(off);
  for_each_backend([&](const std::string& b) {
    cuda::grouped_matmul_forward(y.data(), x.data(), w.data(), d_off.data(), off.data(), E, I, O, nullptr);
    cuda::grouped_matmul_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), d_off.data(), off.data(), E, I,
                                  O, nullptr);
    EXPECT_EQ(dw.download(), dw0) << b;
  });
  const std::vector<int32_t> bad{0, 5, 3, 3, 3};
  EXPECT_THROW(cuda::grouped_matmul_forward(y.data(), x.data(), w.data(), d_off.data(), bad.data(), E, I, O, nullptr),
               Error);
}

TEST(CudaGroupedMatmul, BackendSelection) {
  EXPECT_STREQ(cuda::grouped_gemm_backend(), "cutlass");  // the default: twice cuBLAS's rate on expert shapes
  EXPECT_THROW(cuda::set_grouped_gemm_backend("magic"), Error);
  cuda::set_grouped_gemm_backend("cublas");
  EXPECT_STREQ(cuda::grouped_gemm_backend(), "cublas");
  cuda::set_grouped_gemm_backend("cutlass");
  EXPECT_STREQ(cuda::grouped_gemm_backend(), "cutlass");
}

TEST(CudaGroupedMatmul, DeterministicRunToRun) {
  MOP_REQUIRE_GPU();
  std::mt19937 g(9);
  std::vector<int> counts(64);
  for (auto& c : counts) c = (g() % 5 == 0) ? 0 : int(g() % 300);
  const auto off = offsets_of(counts);
  const int E = 64, I = 512, O = 384, M = off[E];
  const auto x = random_bf16_values(size_t(M) * I, 1), w = random_bf16_values(size_t(E) * O * I, 2),
             dy = random_bf16_values(size_t(M) * O, 3), dw0 = random_bf16_values(size_t(E) * O * I, 4);
  for_each_backend([&](const std::string& backend) {
    const Outputs a = run_gpu(off, x, w, dy, dw0, E, I, O), b = run_gpu(off, x, w, dy, dw0, E, I, O);
    EXPECT_EQ(a.y, b.y) << backend;
    EXPECT_EQ(a.dx, b.dx) << backend;
    EXPECT_EQ(a.dw, b.dw) << backend;
  });
}

// Prints, never fails: the moe-7b expert gate+up GEMM (65,536 token-rows, 2048 -> 1536, 64 experts
// with equal counts) next to one dense GEMM of the same FLOPs.
TEST(CudaGroupedMatmul, BenchmarkMoe7bExperts) {
  MOP_REQUIRE_GPU();
  const int E = 64, M = 65536, I = 2048, O = 1536;
  const auto off = offsets_of(std::vector<int>(E, M / E));
  DeviceArray<bf16> x(to_bf16(random_bf16_values(size_t(M) * I, 31))),
      w(to_bf16(random_bf16_values(size_t(E) * O * I, 32))), y(size_t(M) * O), dy(to_bf16(random_bf16_values(size_t(M) * O, 33))),
      dx(size_t(M) * I);
  DeviceArray<float> dw(size_t(E) * O * I);
  DeviceArray<int32_t> d_off(off);
  const double flop = 2.0 * M * I * O;
  for_each_backend([&](const std::string& backend) {
    const double t_fwd = median_ms([&] {
      cuda::grouped_matmul_forward(y.data(), x.data(), w.data(), d_off.data(), off.data(), E, I, O, nullptr);
    });
    const double t_dx = median_ms([&] {
      cuda::grouped_matmul_backward(dx.data(), nullptr, dy.data(), x.data(), w.data(), d_off.data(), off.data(), E, I,
                                    O, nullptr);
    });
    const double t_dw = median_ms([&] {
      cuda::grouped_matmul_backward(nullptr, dw.data(), dy.data(), x.data(), w.data(), d_off.data(), off.data(), E, I,
                                    O, nullptr);
    });
    std::printf("[bench] grouped %-7s %d experts, %d rows, %d -> %d: fwd %.3f ms %.0f TFLOP/s | dx %.3f ms %.0f | "
                "dw %.3f ms %.0f\n",
                backend.c_str(), E, M, I, O, t_fwd, flop / t_fwd / 1e9, t_dx, flop / t_dx / 1e9, t_dw,
                flop / t_dw / 1e9);
  });
  const double t_dense = median_ms([&] { cuda::matmul_forward(y.data(), x.data(), w.data(), M, I, O, nullptr); });
  std::printf("[bench] dense same FLOPs (%d x %d -> %d): %.3f ms %.0f TFLOP/s\n", M, I, O, t_dense,
              flop / t_dense / 1e9);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// dw_overwrite (the first backward after the gradients were zeroed): from any prior contents, the
// same bits as accumulating into zeros, empty experts zeroed, for bf16 and fp32 gradients on both
// backends (CUTLASS's bf16 product stores without reading dw; the other paths zero, then add).
TEST(CudaGroupedMatmul, OverwriteEqualsAccumulatingIntoZeros) {
  MOP_REQUIRE_GPU();
  const std::vector<int> counts{37, 0, 0, 130, 1, 0, 64, 0};  // empty experts alone and in a run
  const auto off = offsets_of(counts);
  const int E = int(counts.size()), I = 136, O = 200, M = off[size_t(E)];
  const DeviceArray<bf16> x(to_bf16(random_bf16_values(size_t(M) * I, 41))),
      w(to_bf16(random_bf16_values(size_t(E) * O * I, 42))), dy(to_bf16(random_bf16_values(size_t(M) * O, 43)));
  DeviceArray<int32_t> d_off(off);
  const std::vector<float> junk = random_bf16_values(size_t(E) * O * I, 44);
  const std::vector<float> zeros(junk.size(), 0.f);
  for_each_backend([&](const std::string& b) {
    {
      DeviceArray<bf16> acc(to_bf16(zeros)), over(to_bf16(junk));
      cuda::grouped_matmul_backward(nullptr, acc.data(), dy.data(), x.data(), w.data(), d_off.data(), off.data(), E, I,
                                    O, nullptr);
      cuda::grouped_matmul_backward(nullptr, over.data(), dy.data(), x.data(), w.data(), d_off.data(), off.data(), E,
                                    I, O, nullptr, /*dw_overwrite=*/true);
      const std::vector<float> a = to_f32(acc.download()), o = to_f32(over.download());
      EXPECT_EQ(a, o) << b << " bf16";
      for (int e : {1, 2, 5, 7})
        EXPECT_EQ(std::count(o.begin() + long(e) * O * I, o.begin() + long(e + 1) * O * I, 0.f), long(O) * I)
            << b << " expert " << e;
    }
    {
      DeviceArray<float> acc(zeros), over(junk);
      cuda::grouped_matmul_backward(nullptr, acc.data(), dy.data(), x.data(), w.data(), d_off.data(), off.data(), E, I,
                                    O, nullptr);
      cuda::grouped_matmul_backward(nullptr, over.data(), dy.data(), x.data(), w.data(), d_off.data(), off.data(), E,
                                    I, O, nullptr, /*dw_overwrite=*/true);
      EXPECT_EQ(acc.download(), over.download()) << b << " fp32";
    }
  });
  // No rows at all: all zeros.
  const std::vector<int32_t> none(size_t(E) + 1, 0);
  DeviceArray<int32_t> d_none(none);
  DeviceArray<bf16> over(to_bf16(junk));
  cuda::grouped_matmul_backward(nullptr, over.data(), dy.data(), x.data(), w.data(), d_none.data(), none.data(), E, I,
                                O, nullptr, true);
  EXPECT_EQ(to_f32(over.download()), zeros);
}

// GroupedSmLimit narrows the persistent kernels' grid (for weight gradients beside communication):
// each tile is computed as before, so every product keeps its bits, whatever the limit; the limit
// ends with its scope.
TEST(CudaGroupedMatmul, SmLimitKeepsTheBits) {
  MOP_REQUIRE_GPU();
  std::mt19937 g(17);
  std::vector<int> counts(16);
  for (auto& c : counts) c = (g() % 4 == 0) ? 0 : int(g() % 700);
  const auto off = offsets_of(counts);
  const int E = 16, I = 256, O = 392, M = off[size_t(E)];
  const auto x = random_bf16_values(size_t(M) * I, 51), w = random_bf16_values(size_t(E) * O * I, 52),
             dy = random_bf16_values(size_t(M) * O, 53), dw0 = random_bf16_values(size_t(E) * O * I, 54);
  const Outputs all = run_gpu(off, x, w, dy, dw0, E, I, O);
  for (int sms : {1, 7, 100, 100000}) {
    Outputs lim;
    {
      const cuda::GroupedSmLimit limit(sms);
      lim = run_gpu(off, x, w, dy, dw0, E, I, O);
    }
    EXPECT_EQ(lim.y, all.y) << sms << " SMs";
    EXPECT_EQ(lim.dx, all.dx) << sms << " SMs";
    EXPECT_EQ(lim.dw, all.dw) << sms << " SMs";
  }
  EXPECT_THROW(cuda::GroupedSmLimit(-1), Error);
}
