// cuda::adamw_step(_multi) and sum_squares against mop::cpu.
// Tolerances: AdamW evaluates the CPU op's fp32 expression with every operation rounded the same
// way (no FMA contraction), so it should agree bit for bit; the check allows a few ulps
// (rtol 4 FLT_EPSILON, atol 1e-7 for m after cancellation) in case the host compiler contracts.
// The bf16 compute copy must equal the updated fp32 weights rounded to bf16 exactly.
// sum_squares adds exact fp64 squares in a different order than the CPU: rtol 1e-12.
#include "ops/cpu/adamw.h"
#include "ops/cuda/adamw.h"

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <memory>

#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;

namespace {

constexpr double kRtol = 4 * FLT_EPSILON, kAtol = 1e-7;


cuda::AdamWArgs gpu_args(const cpu::AdamWStep& s) {
  return {s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, float(1.0 - std::pow(double(s.beta1), s.step)),
          float(1.0 - std::pow(double(s.beta2), s.step)), s.grad_scale};
}

// One optimiser tensor on both sides. offset > 0 shifts every device pointer by that many
// elements (fp32 and bf16) to force the scalar path.
struct Tensor {
  size_t n, offset;
  float wd;
  bool with_bf16;
  std::vector<float> p, m, v;  // CPU state
  DeviceArray<float> d_p, d_g, d_m, d_v;
  DeviceArray<bf16> d_pb;
  Tensor(size_t n_, float wd_, bool bf, uint64_t seed, size_t off = 0)
      : n(n_), offset(off), wd(wd_), with_bf16(bf), p(normals(n_, seed, 1.f)), m(n_, 0.f), v(n_, 0.f),
        d_p(padded(p)), d_g(off + n_), d_m(off + n_), d_v(off + n_), d_pb(bf ? off + n_ : 0) {}
  std::vector<float> padded(const std::vector<float>& x) const {
    std::vector<float> out(offset, 0.f);
    out.insert(out.end(), x.begin(), x.end());
    return out;
  }
  std::vector<float> unpad(const std::vector<float>& x) const { return {x.begin() + offset, x.end()}; }
  cuda::AdamWTensor view() const {
    return {d_p.data() + offset, d_g.data() + offset, d_m.data() + offset, d_v.data() + offset,
            with_bf16 ? d_pb.data() + offset : nullptr, n, wd};
  }
  // Fresh gradients on both sides, then the CPU step.
  void cpu_step(cpu::AdamWStep s, uint64_t seed) {
    const std::vector<float> g = normals(n, seed, 1.f);
    d_g.upload(padded(g));
    s.weight_decay = wd;
    cpu::adamw_step(p.data(), g.data(), m.data(), v.data(), n, s);
  }
  void compare() const {
    const std::vector<float> gp = unpad(d_p.download());
    expect_close(gp, p, kRtol, kAtol, "p");
    expect_close(unpad(d_m.download()), m, kRtol, kAtol, "m");
    expect_close(unpad(d_v.download()), v, kRtol, kAtol, "v");
    if (with_bf16) {
      std::vector<float> rounded(gp.size());
      for (size_t i = 0; i < gp.size(); ++i) rounded[i] = round_bf16(gp[i]);
      const std::vector<bf16> pb = d_pb.download();
      expect_close(to_f32(std::vector<bf16>(pb.begin() + offset, pb.end())), rounded, 0, 0, "p_bf16");
    }
  }
};

void run_steps(std::vector<std::unique_ptr<Tensor>>& ts, int steps, bool single) {
  cpu::AdamWStep s;
  s.lr = 1e-3f, s.beta1 = 0.9f, s.beta2 = 0.95f, s.eps = 1e-8f, s.grad_scale = 0.5f;
  for (int step = 1; step <= steps; ++step) {
    s.step = step;
    std::vector<cuda::AdamWTensor> views;
    for (size_t i = 0; i < ts.size(); ++i) {
      ts[i]->cpu_step(s, 1000 * step + i);
      views.push_back(ts[i]->view());
    }
    cuda::AdamWArgs a = gpu_args(s);
    if (single) {
      for (const auto& t : views) {
        a.weight_decay = t.weight_decay;
        cuda::adamw_step(t.p, t.g, t.m, t.v, t.p_bf16, t.n, a, nullptr);
      }
    } else {
      cuda::adamw_step_multi(views.data(), int(views.size()), a, nullptr);
    }
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (size_t i = 0; i < ts.size(); ++i) {
      SCOPED_TRACE(::testing::Message() << "step " << step << " tensor " << i << " n=" << ts[i]->n);
      ts[i]->compare();
    }
  }
}

}  // namespace

TEST(CudaAdamW, MultiTensorMatchesCpu) {
  MOP_REQUIRE_GPU();
  const size_t sizes[] = {1, 7, 1000, 4099, 70001};
  const float wds[] = {0.f, 0.1f, 0.01f, 0.f, 0.05f};
  std::vector<std::unique_ptr<Tensor>> ts;
  for (int i = 0; i < 5; ++i) ts.push_back(std::make_unique<Tensor>(sizes[i], wds[i], i % 2 == 1, 10 + i));
  ts.push_back(std::make_unique<Tensor>(0, 0.1f, true, 99));  // empty tensors are skipped
  run_steps(ts, 3, false);
}

TEST(CudaAdamW, ManyTensorsSpanSeveralLaunches) {
  MOP_REQUIRE_GPU();
  std::vector<std::unique_ptr<Tensor>> ts;
  for (int i = 0; i < 100; ++i)
    ts.push_back(std::make_unique<Tensor>(1 + (i * 37) % 500, i % 3 ? 0.1f : 0.f, i % 2 == 1, i));
  run_steps(ts, 2, false);
}

TEST(CudaAdamW, SingleTensorAndMisalignedPointers) {
  MOP_REQUIRE_GPU();
  std::vector<std::unique_ptr<Tensor>> ts;
  ts.push_back(std::make_unique<Tensor>(4099, 0.1f, true, 1));
  ts.push_back(std::make_unique<Tensor>(4099, 0.1f, true, 2, 1));  // offset 1: scalar path
  ts.push_back(std::make_unique<Tensor>(9000, 0.f, false, 3, 3));
  run_steps(ts, 2, true);
}

TEST(CudaAdamW, SumSquaresMatchesCpuAndIsDeterministic) {
  MOP_REQUIRE_GPU();
  for (size_t n : {size_t(0), size_t(1), size_t(1000), size_t(4099), (size_t(1) << 20) + 3}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const std::vector<float> g = normals(n, n + 1, 0.3f);
    const double ref = cpu::sum_squares(g.data(), n);
    DeviceArray<float> d_g(g), scratch(cuda::sum_squares_scratch_floats(n));
    DeviceArray<double> d_out(std::vector<double>{-1.0});
    cuda::sum_squares(d_out.data(), d_g.data(), n, scratch.data(), nullptr);
    const double got = d_out.download()[0];
    EXPECT_NEAR(got, ref, 1e-12 * ref);
    cuda::sum_squares(d_out.data(), d_g.data(), n, scratch.data(), nullptr);
    EXPECT_EQ(d_out.download()[0], got);
  }
}

// bf16 gradients, starting at every offset into a 16-byte vector (the scalar head and tail around
// the vector body): the exact squares of the bf16 values, as the CPU adds them.
TEST(CudaAdamW, SumSquaresBf16AtEveryAlignment) {
  MOP_REQUIRE_GPU();
  for (size_t n : {size_t(1), size_t(7), size_t(8), size_t(4099), (size_t(1) << 20) + 5, size_t(9'000'011)}) {
    const std::vector<float> f = normals(n + 8, n + 7, 0.3f);
    std::vector<bf16> h(f.size());
    std::vector<float> rounded(f.size());
    for (size_t i = 0; i < f.size(); ++i) h[i] = __float2bfloat16(f[i]), rounded[i] = __bfloat162float(h[i]);
    DeviceArray<bf16> d_g(h);
    DeviceArray<float> scratch(cuda::sum_squares_scratch_floats(n));
    DeviceArray<double> d_out(std::vector<double>{-1.0});
    for (size_t off = 0; off < 8; ++off) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " offset=" << off);
      const double ref = cpu::sum_squares(rounded.data() + off, n);
      cuda::sum_squares(d_out.data(), d_g.data() + off, n, scratch.data(), nullptr);
      const double got = d_out.download()[0];
      EXPECT_NEAR(got, ref, 1e-12 * ref);
      cuda::sum_squares(d_out.data(), d_g.data() + off, n, scratch.data(), nullptr);
      EXPECT_EQ(d_out.download()[0], got);
    }
  }
}

TEST(CudaAdamW, Timing) {
  MOP_REQUIRE_GPU();
  const size_t per = 25'000'000;  // 4 tensors: 100M parameters
  std::vector<std::unique_ptr<DeviceArray<float>>> bufs;
  std::vector<std::unique_ptr<DeviceArray<bf16>>> bf;
  std::vector<cuda::AdamWTensor> views;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) bufs.push_back(std::make_unique<DeviceArray<float>>(per));
    bf.push_back(std::make_unique<DeviceArray<bf16>>(per));
    const size_t b = bufs.size() - 4;
    views.push_back({bufs[b]->data(), bufs[b + 1]->data(), bufs[b + 2]->data(), bufs[b + 3]->data(), bf.back()->data(),
                     per, 0.1f});
  }
  const cuda::AdamWArgs a{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.1f, 0.05f, 1.f};
  DeviceArray<float> scratch(cuda::sum_squares_scratch_floats(per));
  DeviceArray<double> d_out(1);
  const float step = median_ms([&] { cuda::adamw_step_multi(views.data(), int(views.size()), a, nullptr); });
  const float sq = median_ms([&] {
    for (const auto& t : views) cuda::sum_squares(d_out.data(), t.g, t.n, scratch.data(), nullptr);
  });
  const float sq16 = median_ms([&] {
    for (const auto& b : bf) cuda::sum_squares(d_out.data(), b->data(), per, scratch.data(), nullptr);
  });
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const double n = 4.0 * per;
  // Per parameter: read p, g, m, v (16 B), write p, m, v (12 B) and the bf16 copy (2 B).
  std::printf("[adamw %.0fM params] step %.3f ms %.0f GB/s; sum_squares fp32 %.3f ms %.0f GB/s, bf16 %.3f ms %.0f GB/s\n",
              n * 1e-6, step, 30 * n / step * 1e-6, sq, 4 * n / sq * 1e-6, sq16, 2 * n / sq16 * 1e-6);
  // Both read at least half the device's copy bandwidth (4.3 TB/s read + write on the H200; the
  // scalar loop before reached 1.2 TB/s on bf16).
  EXPECT_GT(2 * n / sq16 * 1e-6, 2000.0);
  EXPECT_GT(4 * n / sq * 1e-6, 2000.0);
}
