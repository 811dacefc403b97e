// cuda::router_* and the load-balancing statistics against mop::cpu on the same fp32 inputs.
// Tolerances: both sides do the router math in fp64 and round once to fp32, so probs, w and
// dlogits agree to rtol 1e-5 (atol 1e-7 for values near 0, e.g. dl = p (dp - pdp) after
// cancellation); selected experts and counts are integers and must match exactly; the lb loss
// sums fp32-rounded column means (rtol 1e-5); its gradient is the same fp64 expression (rtol 1e-6).
#include "ops/cpu/router.h"
#include "ops/cuda/router.h"

#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;
using cpu::RouterConfig;
using cpu::RouterKind;

namespace {

constexpr double kRtol = 1e-5, kAtol = 1e-7;

RouterConfig make_cfg(RouterKind kind, int E, int K, bool norm, int groups = 1, int topk_groups = 1,
                      double scale = 1.0) {
  RouterConfig c;
  c.kind = kind, c.E = E, c.K = K, c.norm_topk = norm, c.n_groups = groups, c.topk_groups = topk_groups;
  c.routed_scale = scale;
  return c;
}

struct Routed {
  std::vector<float> probs, w;
  std::vector<int32_t> idx;
};
Routed cpu_forward(const std::vector<float>& logits, const std::vector<float>* bias, const RouterConfig& c, int N) {
  Routed r{std::vector<float>(size_t(N) * c.E), std::vector<float>(size_t(N) * c.K),
           std::vector<int32_t>(size_t(N) * c.K)};
  cpu::router_forward<float>(r.probs.data(), r.idx.data(), r.w.data(), logits.data(), bias ? bias->data() : nullptr,
                             c, N);
  return r;
}
Routed gpu_forward(const std::vector<float>& logits, const std::vector<float>* bias, const RouterConfig& c, int N) {
  DeviceArray<float> d_logits(logits), d_bias(bias ? *bias : std::vector<float>()), d_probs(size_t(N) * c.E),
      d_w(size_t(N) * c.K);
  DeviceArray<int32_t> d_idx(size_t(N) * c.K);
  cuda::router_forward(d_probs.data(), d_idx.data(), d_w.data(), d_logits.data(), bias ? d_bias.data() : nullptr, c,
                       N, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {d_probs.download(), d_w.download(), d_idx.download()};
}
std::vector<float> gpu_backward(const std::vector<float>& dw, const std::vector<float>* dprobs, const Routed& fwd,
                                const RouterConfig& c, int N) {
  DeviceArray<float> d_dw(dw), d_dp(dprobs ? *dprobs : std::vector<float>()), d_probs(fwd.probs),
      d_dl(size_t(N) * c.E);
  DeviceArray<int32_t> d_idx(fwd.idx);
  cuda::router_backward(d_dl.data(), d_dw.data(), dprobs ? d_dp.data() : nullptr, d_probs.data(), d_idx.data(), c, N,
                        nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return d_dl.download();
}

struct Case {
  RouterConfig cfg;
  bool bias;
  int N;
};
const Case kCases[] = {
    {make_cfg(RouterKind::softmax, 8, 2, true), false, 7},
    {make_cfg(RouterKind::softmax, 8, 8, true), false, 7},  // K == E
    {make_cfg(RouterKind::softmax, 8, 1, false), false, 1},
    {make_cfg(RouterKind::sigmoid, 8, 8, false), true, 7},  // K == E, sigmoid
    {make_cfg(RouterKind::softmax, 64, 8, true, 1, 1, 2.5), false, 333},
    {make_cfg(RouterKind::softmax, 128, 8, false), false, 333},
    {make_cfg(RouterKind::softmax, 160, 2, true), false, 7},
    {make_cfg(RouterKind::sigmoid, 128, 2, true), true, 333},
    {make_cfg(RouterKind::sigmoid, 160, 8, true, 1, 1, 2.5), true, 333},
    {make_cfg(RouterKind::sigmoid, 160, 1, false), false, 7},
    {make_cfg(RouterKind::sigmoid, 64, 8, true, 8, 4, 2.5), true, 333},  // DeepSeek-style groups
    {make_cfg(RouterKind::softmax, 64, 2, false, 8, 4), false, 7},
    {make_cfg(RouterKind::sigmoid, 256, 8, true, 8, 4, 2.5), true, 333},
    {make_cfg(RouterKind::sigmoid, 64, 8, true, 64, 8), true, 7},  // groups of one expert
};

std::string describe(const Case& t) {
  const RouterConfig& c = t.cfg;
  return fmt::format("{} E={} K={} norm={} groups={}/{} scale={} bias={} N={}",
                     c.kind == RouterKind::softmax ? "softmax" : "sigmoid", c.E, c.K, c.norm_topk, c.topk_groups,
                     c.n_groups, c.routed_scale, t.bias, t.N);
}

template <class T> bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace

TEST(CudaRouter, ForwardMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (const Case& t : kCases) {
    SCOPED_TRACE(describe(t));
    const RouterConfig& c = t.cfg;
    const auto logits = normals(size_t(t.N) * c.E, 17 * c.E + c.K + t.N, 2.f), bias = normals(c.E, c.E + 5, 0.1f);
    const Routed ref = cpu_forward(logits, t.bias ? &bias : nullptr, c, t.N);
    const Routed got = gpu_forward(logits, t.bias ? &bias : nullptr, c, t.N);
    EXPECT_EQ(got.idx, ref.idx);  // random logits: no near-ties, fp64 math on both sides
    expect_close(got.probs, ref.probs, kRtol, kAtol, "probs");
    expect_close(got.w, ref.w, kRtol, kAtol, "w");
  }
}

TEST(CudaRouter, BackwardMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (const Case& t : kCases) {
    for (bool with_dprobs : {true, false}) {
      SCOPED_TRACE(describe(t) + (with_dprobs ? " +dprobs" : ""));
      const RouterConfig& c = t.cfg;
      const auto logits = normals(size_t(t.N) * c.E, 3 * c.E + c.K, 2.f), bias = normals(c.E, 9, 0.1f);
      const auto dw = normals(size_t(t.N) * c.K, 11, 1.f), dprobs = normals(size_t(t.N) * c.E, 13, 1.f);
      // Both backwards see the same forward outputs (the CPU's).
      const Routed fwd = cpu_forward(logits, t.bias ? &bias : nullptr, c, t.N);
      std::vector<float> ref(size_t(t.N) * c.E);
      cpu::router_backward<float>(ref.data(), dw.data(), with_dprobs ? dprobs.data() : nullptr, fwd.probs.data(),
                                  fwd.idx.data(), c, t.N);
      const auto got = gpu_backward(dw, with_dprobs ? &dprobs : nullptr, fwd, c, t.N);
      expect_close(got, ref, kRtol, kAtol, "dlogits");
    }
  }
}

TEST(CudaRouter, TiesPickLowestIndices) {
  MOP_REQUIRE_GPU();
  const int N = 5;
  for (RouterKind kind : {RouterKind::softmax, RouterKind::sigmoid}) {
    const RouterConfig c = make_cfg(kind, 8, 3, true);
    const std::vector<float> equal(size_t(N) * 8, 0.25f);
    Routed got = gpu_forward(equal, nullptr, c, N);
    EXPECT_EQ(got.idx, cpu_forward(equal, nullptr, c, N).idx);
    for (int n = 0; n < N; ++n)
      EXPECT_EQ(std::vector<int32_t>(got.idx.begin() + 3 * n, got.idx.begin() + 3 * n + 3),
                (std::vector<int32_t>{0, 1, 2}));
    for (float w : got.w) EXPECT_NEAR(w, 1.0 / 3, 1e-7);
  }
  // Bias ties: equal probs, bias favours the odd experts equally -> 1, 3, 5.
  const std::vector<float> zeros(8, 0.f), bias = {0, .5f, 0, .5f, 0, .5f, 0, .5f};
  Routed got = gpu_forward(zeros, &bias, make_cfg(RouterKind::sigmoid, 8, 3, true), 1);
  EXPECT_EQ(got.idx, (std::vector<int32_t>{1, 3, 5}));
  // Tied groups: the lower group index wins.
  got = gpu_forward(zeros, nullptr, make_cfg(RouterKind::sigmoid, 8, 2, true, 4, 2), 1);
  EXPECT_EQ(got.idx, (std::vector<int32_t>{0, 1}));
  // Group scores 1.0, 1.25, 1.25, 1.0: expert 0 scores best but its group loses (cpu test's case).
  const std::vector<float> gbias = {0.5f, -0.5f, 0.125f, 0.125f, 0.25f, 0.f, 0.f, 0.f};
  got = gpu_forward(zeros, &gbias, make_cfg(RouterKind::sigmoid, 8, 2, true, 4, 2, 3.0), 1);
  EXPECT_EQ(got.idx, (std::vector<int32_t>{4, 2}));
  EXPECT_EQ(got.w, (std::vector<float>{1.5f, 1.5f}));
  got = gpu_forward(zeros, &gbias, make_cfg(RouterKind::sigmoid, 8, 2, false, 4, 1), 1);
  EXPECT_EQ(got.idx, (std::vector<int32_t>{2, 3}));
}

// Load-balancing statistics on the GPU's own routing; the CPU op gets the same probs and ids.
static void check_lb(const RouterConfig& c, int N, const std::vector<float>& logits) {
  const Routed fwd = gpu_forward(logits, nullptr, c, N);
  std::vector<int32_t> counts_ref(c.E);
  const float loss_ref =
      cpu::moe_lb_loss_forward<float>(counts_ref.data(), fwd.probs.data(), fwd.idx.data(), N, c.E, c.K);
  DeviceArray<float> d_probs(fwd.probs), d_loss(std::vector<float>{-1.f}), d_mean(c.E);
  DeviceArray<int32_t> d_idx(fwd.idx), d_counts(std::vector<int32_t>(c.E, 7));  // 7: must be zeroed
  cuda::moe_expert_counts(d_counts.data(), d_idx.data(), N, c.E, c.K, nullptr);
  cuda::moe_lb_loss(d_loss.data(), d_mean.data(), d_probs.data(), d_counts.data(), N, c.E, c.K, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(d_counts.download(), counts_ref);
  expect_close(d_loss.download(), {loss_ref}, kRtol, 0, "lb loss");
  std::vector<float> mean_ref(c.E, 0.f);
  for (int e = 0; e < c.E; ++e) {
    double s = 0;
    for (int n = 0; n < N; ++n) s += fwd.probs[size_t(n) * c.E + e];
    mean_ref[e] = N ? float(s / N) : 0.f;
  }
  expect_close(d_mean.download(), mean_ref, 1e-6, 0, "probs mean");

  std::vector<float> dprobs = normals(size_t(N) * c.E, 21, 1.f), dprobs_ref = dprobs;
  cpu::moe_lb_loss_backward<float>(dprobs_ref.data(), 0.01f, counts_ref.data(), N, c.E, c.K);
  DeviceArray<float> d_dprobs(dprobs);
  cuda::moe_lb_loss_backward(d_dprobs.data(), 0.01f, d_counts.data(), N, c.E, c.K, nullptr);
  expect_close(d_dprobs.download(), dprobs_ref, 1e-6, 0, "dprobs (accumulated)");
}

TEST(CudaRouter, LoadBalancingLossMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (const Case& t : kCases) {
    SCOPED_TRACE(describe(t));
    check_lb(t.cfg, t.N, normals(size_t(t.N) * t.cfg.E, t.N + t.cfg.E, 2.f));
  }
}

TEST(CudaRouter, AllTokensToOneExpertLeavesOthersEmpty) {
  MOP_REQUIRE_GPU();
  for (int K : {1, 2}) {
    const int N = 333, E = 64;
    const RouterConfig c = make_cfg(RouterKind::softmax, E, K, true);
    auto logits = normals(size_t(N) * E, 77, 1.f);
    for (int n = 0; n < N; ++n) logits[size_t(n) * E + 3] = 30.f;
    const Routed got = gpu_forward(logits, nullptr, c, N);
    for (int n = 0; n < N; ++n) EXPECT_EQ(got.idx[size_t(n) * K], 3);
    EXPECT_EQ(got.idx, cpu_forward(logits, nullptr, c, N).idx);
    check_lb(c, N, logits);
  }
}

TEST(CudaRouter, EmptyBatchIsANoOp) {
  MOP_REQUIRE_GPU();
  const RouterConfig c = make_cfg(RouterKind::sigmoid, 8, 2, true);
  cuda::router_forward(nullptr, nullptr, nullptr, nullptr, nullptr, c, 0, nullptr);
  cuda::router_backward(nullptr, nullptr, nullptr, nullptr, nullptr, c, 0, nullptr);
  DeviceArray<int32_t> d_counts(std::vector<int32_t>(8, 5));
  DeviceArray<float> d_loss(std::vector<float>{3.f}), d_mean(8);
  cuda::moe_expert_counts(d_counts.data(), nullptr, 0, 8, 2, nullptr);
  cuda::moe_lb_loss(d_loss.data(), d_mean.data(), nullptr, d_counts.data(), 0, 8, 2, nullptr);
  cuda::moe_lb_loss_backward(nullptr, 1.f, d_counts.data(), 0, 8, 2, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(d_counts.download(), std::vector<int32_t>(8, 0));
  EXPECT_EQ(d_loss.download(), std::vector<float>{0.f});
}

TEST(CudaRouter, BadConfigThrows) {
  MOP_REQUIRE_GPU();
  EXPECT_THROW(cuda::router_forward(nullptr, nullptr, nullptr, nullptr, nullptr,
                                    make_cfg(RouterKind::softmax, 4, 5, true), 1, nullptr),
               mop::Error);
  EXPECT_THROW(cuda::router_forward(nullptr, nullptr, nullptr, nullptr, nullptr,
                                    make_cfg(RouterKind::softmax, 8, 2, true, 3, 1), 1, nullptr),
               mop::Error);
}

TEST(CudaRouter, Deterministic) {
  MOP_REQUIRE_GPU();
  const int N = 333;
  const RouterConfig c = make_cfg(RouterKind::sigmoid, 160, 8, true, 8, 4, 2.5);
  const auto logits = normals(size_t(N) * c.E, 1, 2.f), bias = normals(c.E, 2, 0.1f);
  const auto dw = normals(size_t(N) * c.K, 3, 1.f), dprobs = normals(size_t(N) * c.E, 4, 1.f);
  auto run = [&] {
    Routed f = gpu_forward(logits, &bias, c, N);
    std::vector<float> dl = gpu_backward(dw, &dprobs, f, c, N);
    DeviceArray<float> d_probs(f.probs), d_loss(1), d_mean(c.E);
    DeviceArray<int32_t> d_idx(f.idx), d_counts(c.E);
    cuda::moe_expert_counts(d_counts.data(), d_idx.data(), N, c.E, c.K, nullptr);
    cuda::moe_lb_loss(d_loss.data(), d_mean.data(), d_probs.data(), d_counts.data(), N, c.E, c.K, nullptr);
    f.w.push_back(d_loss.download()[0]);
    f.probs.insert(f.probs.end(), dl.begin(), dl.end());
    return f;
  };
  const Routed a = run(), b = run();
  EXPECT_TRUE(bitwise_equal(a.probs, b.probs));  // probs and dlogits
  EXPECT_TRUE(bitwise_equal(a.w, b.w));          // w and the lb loss
  EXPECT_EQ(a.idx, b.idx);
}

TEST(CudaRouter, Timing) {
  MOP_REQUIRE_GPU();
  const int N = 16384;
  const RouterConfig c = make_cfg(RouterKind::sigmoid, 256, 8, true, 8, 4, 2.5);
  const auto logits = normals(size_t(N) * c.E, 5, 2.f), bias = normals(c.E, 6, 0.1f);
  DeviceArray<float> d_logits(logits), d_bias(bias), d_probs(size_t(N) * c.E), d_w(size_t(N) * c.K),
      d_dl(size_t(N) * c.E), d_dw(normals(size_t(N) * c.K, 7, 1.f)), d_loss(1), d_mean(c.E);
  DeviceArray<int32_t> d_idx(size_t(N) * c.K), d_counts(c.E);
  const double bytes_ne = double(N) * c.E * sizeof(float);
  const float fwd = median_ms([&] {
    cuda::router_forward(d_probs.data(), d_idx.data(), d_w.data(), d_logits.data(), d_bias.data(), c, N, nullptr);
  });
  const float bwd = median_ms([&] {
    cuda::router_backward(d_dl.data(), d_dw.data(), nullptr, d_probs.data(), d_idx.data(), c, N, nullptr);
  });
  const float lb = median_ms([&] {
    cuda::moe_expert_counts(d_counts.data(), d_idx.data(), N, c.E, c.K, nullptr);
    cuda::moe_lb_loss(d_loss.data(), d_mean.data(), d_probs.data(), d_counts.data(), N, c.E, c.K, nullptr);
  });
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::printf("[router N=%d E=%d K=%d] forward %.3f ms %.0f GB/s, backward %.3f ms %.0f GB/s, "
              "lb loss %.3f ms %.0f GB/s\n",
              N, c.E, c.K, fwd, 2 * bytes_ne / fwd * 1e-6, bwd, 2 * bytes_ne / bwd * 1e-6, lb, bytes_ne / lb * 1e-6);
}
