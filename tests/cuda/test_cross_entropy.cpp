// cuda::cross_entropy_forward_backward and sum_losses against mop::cpu (fp64 math on the same
// bf16-representable logits).
// Tolerances: loss and lse come from an fp32 online sum over V terms: rtol 1e-5, atol 1e-4 (lse
// ~ 12; the per-thread fp32 sums lose ~1e-6 relative). dlogits are bf16: rtol 2 kBf16Eps (one
// rounding plus fp32 error that can move it by one more half-step), atol 1e-12; the target
// element dscale (p_t - 1) cancels when p_t ~ 1 (a peaked row) and both sides use the fp32 lse,
// so it gets atol 4e-6 |dscale|. sum_losses is fp64 over fp32 values: rtol 1e-12.
#include "ops/cpu/cross_entropy.h"
#include "ops/cuda/cross_entropy.h"

#include <cstdio>

#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;

namespace {

struct Problem {
  int N, V;
  std::vector<float> logits;
  std::vector<int32_t> targets;
  float dscale;
};
// Logits in [-4, 4]; row 0 targets class 0, the last row class V-1, row 2 is ignored (-100) and
// row 1 is peaked (its target logit 20: p_t ~ 1).
Problem make_problem(int N, int V, uint64_t seed) {
  Problem p{N, V, random_bf16_values(size_t(N) * V, seed, 4.f), std::vector<int32_t>(N), 0.f};
  std::mt19937_64 g(seed + 1);
  for (int n = 0; n < N; ++n) p.targets[n] = int32_t(g() % uint64_t(V));
  if (N > 0) p.targets[0] = 0;
  if (N > 1) p.targets[N - 1] = V - 1;
  if (N > 2) p.targets[2] = -100;
  if (N > 1) p.logits[size_t(1) * V + p.targets[1]] = 20.f;
  int valid = 0;
  for (int t : p.targets) valid += t >= 0;
  p.dscale = valid ? 1.f / valid : 0.f;
  return p;
}

struct Result {
  std::vector<float> loss, lse, dlogits;
};
// offset > 0 shifts the bf16 pointers by that many elements to force the scalar path.
Result gpu_run(const Problem& p, bool with_grad, bool alias, size_t offset = 0) {
  std::vector<float> padded(offset, 0.f);
  padded.insert(padded.end(), p.logits.begin(), p.logits.end());
  DeviceArray<bf16> d_logits(to_bf16(padded)), d_dlogits(alias ? 0 : padded.size());
  DeviceArray<int32_t> d_t(p.targets);
  DeviceArray<float> d_loss(std::vector<float>(p.N, -1.f)), d_lse(std::vector<float>(p.N, -1.f));
  bf16* dl = !with_grad ? nullptr : alias ? d_logits.data() + offset : d_dlogits.data() + offset;
  cuda::cross_entropy_forward_backward(d_loss.data(), d_lse.data(), dl, d_logits.data() + offset, d_t.data(), p.N, p.V,
                                       p.dscale, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Result r{d_loss.download(), d_lse.download(), {}};
  if (with_grad) {
    const auto all = to_f32(alias ? d_logits.download() : d_dlogits.download());
    r.dlogits.assign(all.begin() + offset, all.end());
  }
  return r;
}

void check_against_cpu(const Problem& p, size_t offset) {
  SCOPED_TRACE(::testing::Message() << "N=" << p.N << " V=" << p.V << " offset=" << offset);
  Result ref{std::vector<float>(p.N), std::vector<float>(p.N), std::vector<float>(size_t(p.N) * p.V)};
  cpu::cross_entropy_forward<float>(ref.loss.data(), ref.lse.data(), p.logits.data(), p.targets.data(), p.N, p.V);
  cpu::cross_entropy_backward<float>(ref.dlogits.data(), p.logits.data(), ref.lse.data(), p.targets.data(), p.dscale,
                                     p.N, p.V);
  Result got = gpu_run(p, true, false, offset);
  expect_close(got.loss, ref.loss, 1e-5, 1e-4, "loss");
  expect_close(got.lse, ref.lse, 1e-5, 1e-4, "lse");
  // Target elements apart (see the tolerance note), zeroed in the main comparison.
  std::vector<float> got_t, ref_t;
  for (int n = 0; n < p.N; ++n) {
    const int t = p.targets[n];
    if (t < 0) {
      EXPECT_EQ(got.loss[n], 0.f);
      EXPECT_EQ(got.lse[n], 0.f);
      for (int v = 0; v < p.V; ++v) ASSERT_EQ(got.dlogits[size_t(n) * p.V + v], 0.f) << "ignored row " << n;
      continue;
    }
    got_t.push_back(got.dlogits[size_t(n) * p.V + t]), ref_t.push_back(ref.dlogits[size_t(n) * p.V + t]);
    got.dlogits[size_t(n) * p.V + t] = ref.dlogits[size_t(n) * p.V + t] = 0.f;
  }
  expect_close(got.dlogits, ref.dlogits, 2 * kBf16Eps, 1e-12, "dlogits");
  expect_close(got_t, ref_t, 2 * kBf16Eps, 4e-6 * p.dscale, "dlogits at targets");
}

template <class T> bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

double gpu_sum(const std::vector<float>& x) {
  DeviceArray<float> d_x(x);
  DeviceArray<double> d_out(std::vector<double>{-1.0});
  cuda::sum_losses(d_out.data(), d_x.data(), int(x.size()), nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return d_out.download()[0];
}

}  // namespace

TEST(CudaCrossEntropy, MatchesCpu) {
  MOP_REQUIRE_GPU();
  for (int N : {1, 7, 33}) check_against_cpu(make_problem(N, 259, N), 0);
  check_against_cpu(make_problem(7, 32000, 2), 0);
  check_against_cpu(make_problem(5, 151936, 3), 0);
  check_against_cpu(make_problem(7, 32000, 4), 1);  // misaligned: scalar path with V % 8 == 0
}

TEST(CudaCrossEntropy, AliasedAndForwardOnlyAgree) {
  MOP_REQUIRE_GPU();
  for (int V : {259, 32000, 151936}) {
    SCOPED_TRACE(::testing::Message() << "V=" << V);
    const Problem p = make_problem(7, V, V);
    const Result separate = gpu_run(p, true, false), aliased = gpu_run(p, true, true), fwd = gpu_run(p, false, false);
    EXPECT_TRUE(bitwise_equal(separate.dlogits, aliased.dlogits));
    EXPECT_TRUE(bitwise_equal(separate.loss, aliased.loss));
    EXPECT_TRUE(bitwise_equal(separate.loss, fwd.loss));
    EXPECT_TRUE(bitwise_equal(separate.lse, fwd.lse));
  }
}

TEST(CudaCrossEntropy, Deterministic) {
  MOP_REQUIRE_GPU();
  const Problem p = make_problem(5, 151936, 8);
  const Result a = gpu_run(p, true, false), b = gpu_run(p, true, false);
  EXPECT_TRUE(bitwise_equal(a.loss, b.loss));
  EXPECT_TRUE(bitwise_equal(a.lse, b.lse));
  EXPECT_TRUE(bitwise_equal(a.dlogits, b.dlogits));
  EXPECT_EQ(gpu_sum(a.loss), gpu_sum(b.loss));
}

TEST(CudaCrossEntropy, SumLossesMatchesHostSum) {
  MOP_REQUIRE_GPU();
  for (size_t n : {size_t(1), size_t(33), size_t(100003)}) {
    std::vector<float> x(n);
    std::mt19937_64 g(n);
    for (auto& v : x) v = std::uniform_real_distribution<float>(0.f, 12.f)(g);
    double ref = 0;
    for (float v : x) ref += v;
    const double got = gpu_sum(x);
    EXPECT_NEAR(got, ref, 1e-12 * ref) << "n=" << n;
    EXPECT_EQ(got, gpu_sum(x)) << "n=" << n;  // deterministic
  }
}

TEST(CudaCrossEntropy, EmptyBatchIsANoOp) {
  MOP_REQUIRE_GPU();
  cuda::cross_entropy_forward_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 259, 1.f, nullptr);
  DeviceArray<double> d_out(std::vector<double>{5.0});
  cuda::sum_losses(d_out.data(), nullptr, 0, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(d_out.download()[0], 0.0);
}

TEST(CudaCrossEntropy, Timing) {
  MOP_REQUIRE_GPU();
  const int N = 4096, V = 151936;
  const size_t NV = size_t(N) * V;
  DeviceArray<bf16> d_logits(NV), d_dlogits(NV);  // zero logits: contents do not change the work
  DeviceArray<int32_t> d_t(N);
  DeviceArray<float> d_loss(N), d_lse(N);
  DeviceArray<double> d_sum(1);
  const float fb = median_ms([&] {
    cuda::cross_entropy_forward_backward(d_loss.data(), d_lse.data(), d_dlogits.data(), d_logits.data(), d_t.data(), N,
                                         V, 1.f / N, nullptr);
    cuda::sum_losses(d_sum.data(), d_loss.data(), N, nullptr);
  });
  const float f = median_ms([&] {
    cuda::cross_entropy_forward_backward(d_loss.data(), d_lse.data(), nullptr, d_logits.data(), d_t.data(), N, V, 1.f,
                                         nullptr);
  });
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const double bytes = double(NV) * 2;
  // Forward + backward reads each row twice and writes it once.
  std::printf("[cross_entropy N=%d V=%d] fwd+bwd %.3f ms %.0f GB/s; fwd only %.3f ms %.0f GB/s\n", N, V, fb,
              3 * bytes / fb * 1e-6, f, bytes / f * 1e-6);
}
