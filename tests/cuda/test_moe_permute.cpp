// cuda::moe_route_layout and the bf16 row ops against mop::cpu (fp64 math, fp32 result) on the
// same bf16-representable inputs.
// Tolerances: the layout (row_NK, offsets) is integer and must match exactly; moe_permute is a bit
// copy (exact). Sums over k (permute_backward, combine) and dyp = w dy are fp32 then one bf16
// rounding: rtol 2 kBf16Eps (the rounding, <= kBf16Eps, plus fp32 error that can move it one more
// half-step), atol 1e-5 for fp32 cancellation between <= 8 terms of size <= 1. dw is an fp32 dot
// over D products of size <= 1 (no bf16 rounding): rtol 1e-5, atol 1e-6 * D.
#include "ops/cpu/moe_permute.h"
#include "ops/cuda/moe_permute.h"

#include <algorithm>
#include <cstdio>
#include <numeric>

#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;

namespace {

constexpr double kRtol = 2 * kBf16Eps;

// K distinct experts per token (as the router picks them), or all tokens to `only` (and only+2).
std::vector<int32_t> routing(int N, int E, int K, uint64_t seed, int only = -1) {
  std::mt19937_64 g(seed);
  std::vector<int32_t> idx(size_t(N) * K), perm(E);
  for (int n = 0; n < N; ++n) {
    std::iota(perm.begin(), perm.end(), 0);
    if (only >= 0) {
      std::swap(perm[0], perm[only]);
      std::swap(perm[1], perm[only + 2]);
    } else {
      for (int k = 0; k < K; ++k) std::swap(perm[k], perm[k + g() % (E - k)]);
    }
    std::copy_n(perm.begin(), K, idx.begin() + size_t(n) * K);
  }
  return idx;
}

struct Layout {
  std::vector<int32_t> row, offsets;
};
Layout gpu_layout(const std::vector<int32_t>& idx, int N, int E, int K) {
  DeviceArray<int32_t> d_idx(idx), d_row(std::vector<int32_t>(idx.size(), -1)),
      d_off(std::vector<int32_t>(E + 1, -1));
  DeviceArray<uint8_t> ws(cuda::moe_route_layout_workspace(N, E, K));
  cuda::moe_route_layout(d_row.data(), d_off.data(), d_idx.data(), N, E, K, ws.data(), ws.size(), nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {d_row.download(), d_off.download()};
}
Layout cpu_layout(const std::vector<int32_t>& idx, int N, int E, int K) {
  Layout l{std::vector<int32_t>(idx.size()), std::vector<int32_t>(E + 1)};
  cpu::moe_route_layout(l.row.data(), l.offsets.data(), idx.data(), N, E, K);
  return l;
}

struct LCase {
  int N, E, K, only;
};
const LCase kLayoutCases[] = {
    {1, 8, 1, -1},    {7, 8, 2, -1},     {7, 8, 8, -1},    // K == E
    {333, 64, 8, -1}, {333, 160, 8, -1}, {333, 128, 2, -1},
    {333, 160, 1, -1}, {5, 160, 2, -1},                     // many empty experts
    {333, 64, 1, 3},  {333, 64, 2, 3},                      // everything to expert 3 (and 5)
    {4096, 256, 8, -1},                                     // several sort tiles
};

// offset > 0 shifts the bf16 pointers by that many elements to force the scalar path.
void check_row_ops(int N, int E, int K, int D, size_t offset) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " E=" << E << " K=" << K << " D=" << D << " offset=" << offset);
  const size_t M = size_t(N) * K;
  const auto idx = routing(N, E, K, N * 7 + D);
  const Layout lay = cpu_layout(idx, N, E, K);
  const auto x = random_bf16_values(size_t(N) * D, 1 + D), dxp = random_bf16_values(M * D, 2 + D),
             yp = random_bf16_values(M * D, 3 + D), dy = random_bf16_values(size_t(N) * D, 4 + D);
  std::vector<float> w(M);
  std::mt19937_64 g(5);
  for (auto& v : w) v = std::uniform_real_distribution<float>(0.f, 1.f)(g);

  std::vector<float> xp_ref(M * D), dx_ref(size_t(N) * D), y_ref(size_t(N) * D), dyp_ref(M * D), dw_ref(M);
  cpu::moe_permute<float>(xp_ref.data(), x.data(), lay.row.data(), N, K, D);
  cpu::moe_permute_backward<float>(dx_ref.data(), dxp.data(), lay.row.data(), N, K, D);
  cpu::moe_combine<float>(y_ref.data(), yp.data(), w.data(), lay.row.data(), N, K, D);
  cpu::moe_combine_backward<float>(dyp_ref.data(), dw_ref.data(), dy.data(), yp.data(), w.data(), lay.row.data(), N, K,
                                   D);

  auto pad = [&](const std::vector<float>& v) {
    std::vector<float> p(offset, 0.f);
    p.insert(p.end(), v.begin(), v.end());
    return to_bf16(p);
  };
  auto unpad = [&](const DeviceArray<bf16>& a) {
    std::vector<float> v = to_f32(a.download());
    return std::vector<float>(v.begin() + offset, v.end());
  };
  DeviceArray<bf16> d_x(pad(x)), d_dxp(pad(dxp)), d_yp(pad(yp)), d_dy(pad(dy)), d_xp(offset + M * D),
      d_dx(offset + size_t(N) * D), d_y(offset + size_t(N) * D), d_dyp(offset + M * D);
  DeviceArray<float> d_w(w), d_dw(M);
  DeviceArray<int32_t> d_row(lay.row);
  const size_t o = offset;
  cuda::moe_permute(d_xp.data() + o, d_x.data() + o, d_row.data(), N, K, D, nullptr);
  cuda::moe_permute_backward(d_dx.data() + o, d_dxp.data() + o, d_row.data(), N, K, D, nullptr);
  cuda::moe_combine(d_y.data() + o, d_yp.data() + o, d_w.data(), d_row.data(), N, K, D, nullptr);
  cuda::moe_combine_backward(d_dyp.data() + o, d_dw.data(), d_dy.data() + o, d_yp.data() + o, d_w.data(), d_row.data(),
                             N, K, D, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close(unpad(d_xp), xp_ref, 0, 0, "xp");
  expect_close(unpad(d_dx), dx_ref, kRtol, 1e-5, "dx");
  expect_close(unpad(d_y), y_ref, kRtol, 1e-5, "y");
  expect_close(unpad(d_dyp), dyp_ref, kRtol, 1e-6, "dyp");
  expect_close(d_dw.download(), dw_ref, 1e-5, 1e-6 * D, "dw");
}

}  // namespace

TEST(CudaMoePermute, LayoutMatchesCpuExactly) {
  MOP_REQUIRE_GPU();
  for (const LCase& t : kLayoutCases) {
    SCOPED_TRACE(::testing::Message() << "N=" << t.N << " E=" << t.E << " K=" << t.K << " only=" << t.only);
    const auto idx = routing(t.N, t.E, t.K, t.N + t.E + t.K, t.only);
    const Layout got = gpu_layout(idx, t.N, t.E, t.K), ref = cpu_layout(idx, t.N, t.E, t.K);
    EXPECT_EQ(got.row, ref.row);
    EXPECT_EQ(got.offsets, ref.offsets);
  }
}

TEST(CudaMoePermute, RowOpsMatchCpu) {
  MOP_REQUIRE_GPU();
  const int cases[][3] = {{1, 8, 1}, {7, 8, 2}, {7, 8, 8}, {333, 64, 8}, {333, 160, 2}};
  for (const auto& c : cases)
    for (int D : {5, 64, 2048}) check_row_ops(c[0], c[1], c[2], D, 0);
  check_row_ops(33, 64, 8, 64, 1);  // misaligned pointers: scalar fallback with D % 8 == 0
}

TEST(CudaMoePermute, EmptyBatchIsANoOp) {
  MOP_REQUIRE_GPU();
  const int E = 8, K = 2, D = 64;
  EXPECT_EQ(cuda::moe_route_layout_workspace(0, E, K), 0u);
  DeviceArray<int32_t> d_off(std::vector<int32_t>(E + 1, -1));
  cuda::moe_route_layout(nullptr, d_off.data(), nullptr, 0, E, K, nullptr, 0, nullptr);
  cuda::moe_permute(nullptr, nullptr, nullptr, 0, K, D, nullptr);
  cuda::moe_permute_backward(nullptr, nullptr, nullptr, 0, K, D, nullptr);
  cuda::moe_combine(nullptr, nullptr, nullptr, nullptr, 0, K, D, nullptr);
  cuda::moe_combine_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, K, D, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(d_off.download(), std::vector<int32_t>(E + 1, 0));
}

TEST(CudaMoePermute, Deterministic) {
  MOP_REQUIRE_GPU();
  const int N = 333, E = 64, K = 8, D = 2048;
  const size_t M = size_t(N) * K;
  const auto idx = routing(N, E, K, 9);
  const auto dy = to_bf16(random_bf16_values(size_t(N) * D, 10)), yp = to_bf16(random_bf16_values(M * D, 11));
  const auto w = random_bf16_values(M, 12);
  auto run = [&] {
    const Layout lay = gpu_layout(idx, N, E, K);
    DeviceArray<bf16> d_dy(dy), d_yp(yp), d_dyp(M * D), d_y(size_t(N) * D);
    DeviceArray<float> d_w(w), d_dw(M);
    DeviceArray<int32_t> d_row(lay.row);
    cuda::moe_combine(d_y.data(), d_yp.data(), d_w.data(), d_row.data(), N, K, D, nullptr);
    cuda::moe_combine_backward(d_dyp.data(), d_dw.data(), d_dy.data(), d_yp.data(), d_w.data(), d_row.data(), N, K, D,
                               nullptr);
    std::vector<float> out = d_dw.download(), y = to_f32(d_y.download());
    out.insert(out.end(), y.begin(), y.end());
    return std::make_pair(lay.row, out);
  };
  const auto a = run(), b = run();
  EXPECT_EQ(a.first, b.first);
  ASSERT_EQ(a.second.size(), b.second.size());
  EXPECT_EQ(std::memcmp(a.second.data(), b.second.data(), a.second.size() * sizeof(float)), 0);
}

TEST(CudaMoePermute, Timing) {
  MOP_REQUIRE_GPU();
  const int N = 16384, E = 128, K = 8, D = 2048;
  const size_t M = size_t(N) * K;
  DeviceArray<int32_t> d_idx(routing(N, E, K, 13)), d_row(M), d_off(E + 1);
  DeviceArray<uint8_t> ws(cuda::moe_route_layout_workspace(N, E, K));
  DeviceArray<bf16> d_x(size_t(N) * D), d_xp(M * D), d_dyp(M * D);  // zero-filled: contents do not matter
  DeviceArray<float> d_w(M), d_dw(M);
  const float layout = median_ms([&] {
    cuda::moe_route_layout(d_row.data(), d_off.data(), d_idx.data(), N, E, K, ws.data(), ws.size(), nullptr);
  });
  const float perm = median_ms([&] { cuda::moe_permute(d_xp.data(), d_x.data(), d_row.data(), N, K, D, nullptr); });
  const float perm_bwd =
      median_ms([&] { cuda::moe_permute_backward(d_x.data(), d_xp.data(), d_row.data(), N, K, D, nullptr); });
  const float comb =
      median_ms([&] { cuda::moe_combine(d_x.data(), d_xp.data(), d_w.data(), d_row.data(), N, K, D, nullptr); });
  const float comb_bwd = median_ms([&] {
    cuda::moe_combine_backward(d_dyp.data(), d_dw.data(), d_x.data(), d_xp.data(), d_w.data(), d_row.data(), N, K, D,
                               nullptr);
  });
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const double row_bytes = double(D) * 2, gbs = 1e-6;
  // Bytes each op must move: permute and its backward read/write N + M rows; combine_backward
  // reads dy (N rows) and yp (M rows) and writes dyp (M rows).
  std::printf("[moe_permute N=%d K=%d D=%d] layout %.3f ms; permute %.3f ms %.0f GB/s; permute_bwd %.3f ms %.0f GB/s; "
              "combine %.3f ms %.0f GB/s; combine_bwd %.3f ms %.0f GB/s\n",
              N, K, D, layout, perm, (N + M) * row_bytes / perm * gbs, perm_bwd, (N + M) * row_bytes / perm_bwd * gbs,
              comb, (N + M) * row_bytes / comb * gbs, comb_bwd, (N + 2 * M) * row_bytes / comb_bwd * gbs);
}
