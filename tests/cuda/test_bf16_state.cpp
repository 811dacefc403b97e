// The GPU's compact training state: fp32 master weights split into (bf16 hi, 16-bit lo) halves,
// AdamW on that layout, and the bf16-gradient forms of the weight-gradient kernels.
// Bitwise where the code promises it: merge(split(p)) == p; the split AdamW evolves p, m and v
// exactly as the fp32 kernel does. The bf16-gradient kernels form the fp32 sum and round it once,
// so they must equal the fp32 form's result rounded to bf16 within one bf16 ulp (rtol 2^-7). Where
// the reduction is the same kernel (CUTLASS, norms, embedding) nothing else differs; cuBLAS picks
// other algorithms for a bf16 output, whose fp32 sums differ in order: there the atol of the fp32
// dw tests (1e-4 sqrt(K), K the reduction length) is added (seen on the H200: up to 1.2e-4 at K 517).
#include <cfloat>
#include <cmath>
#include <cstring>

#include "cuda_test_util.h"
#include "ops/cuda/adamw.h"
#include "ops/cuda/cast.h"
#include "ops/cuda/embedding.h"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/matmul.h"
#include "ops/cuda/rmsnorm.h"
#include "ops/cuda/rope.h"

using namespace mop;
using namespace mop::test;

namespace {

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
uint16_t bf16_bits(bf16 h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}


// The bf16 rounding the split promises: nearest, ties toward zero magnitude.
uint16_t nearest_ties_down(float p) {
  const uint32_t b = bits(p);
  return uint16_t((b >> 16) + ((b & 0xffffu) > 0x8000u ? 1u : 0u));
}

void expect_bitwise(const std::vector<float>& got, const std::vector<float>& ref, const char* what) {
  ASSERT_EQ(got.size(), ref.size());
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    if (bits(got[i]) != bits(ref[i]) && bad++ == 0) first = i;
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " mismatches, first at " << first << " (got " << got[first] << ", ref "
                     << ref[first] << ")";
}

}  // namespace

TEST(CudaSplitMaster, RoundTripIsExactAndHiIsTheNearestBf16) {
  MOP_REQUIRE_GPU();
  std::vector<float> p = normals(100003, 7, 0.05f);
  // Ties with even and odd upper halves, values that round up across an exponent, zeros, denormals,
  // infinities and the largest finite floats.
  for (uint32_t b : {0x3f808000u, 0x3f818000u, 0xbf818000u, 0x3f7fffffu, 0x3f7f8001u, 0x00000000u, 0x80000000u,
                     0x00000001u, 0x00008001u, 0x7f800000u, 0xff800000u, 0x7f7fffffu, 0xff7f8000u, 0x7f7f8001u})
    p.push_back(from_bits(b));
  std::mt19937_64 g(3);
  for (int i = 0; i < 100000; ++i) {  // random non-NaN bit patterns
    uint32_t b = uint32_t(g());
    if ((b & 0x7fffffffu) > 0x7f800000u) b &= 0xff7fffffu;
    p.push_back(from_bits(b));
  }
  const size_t n = p.size();
  DeviceArray<float> d_p(p), d_back(n);
  DeviceArray<bf16> d_hi(n);
  DeviceArray<uint16_t> d_lo(n);
  cuda::split_master(d_hi.data(), d_lo.data(), d_p.data(), n, nullptr);
  cuda::merge_master(d_back.data(), d_hi.data(), d_lo.data(), n, nullptr);
  expect_bitwise(d_back.download(), p, "merge(split(p))");
  const std::vector<bf16> hi = d_hi.download();
  size_t bad = 0, ties_differ = 0;
  for (size_t i = 0; i < n; ++i) {
    bad += bf16_bits(hi[i]) != nearest_ties_down(p[i]);
    ties_differ += bf16_bits(hi[i]) != f32_to_bf16(p[i]);  // round-to-nearest-even differs on odd ties only
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_LE(ties_differ, 2u + n / 10000) << "hi should differ from round-to-nearest-even on exact ties only";

  // NaN stays NaN through the compute copy and the merge.
  DeviceArray<float> d_nan(std::vector<float>{from_bits(0x7fffffffu), from_bits(0xffc00001u)}), d_nb(2);
  DeviceArray<bf16> d_nh(2);
  DeviceArray<uint16_t> d_nl(2);
  cuda::split_master(d_nh.data(), d_nl.data(), d_nan.data(), 2, nullptr);
  cuda::merge_master(d_nb.data(), d_nh.data(), d_nl.data(), 2, nullptr);
  for (float x : to_f32(d_nh.download())) EXPECT_TRUE(std::isnan(x));
  for (float x : d_nb.download()) EXPECT_TRUE(std::isnan(x));
}

// Three steps of the split AdamW against the fp32 kernel on the same gradients (bf16 gradients are
// given to the fp32 kernel as their exact fp32 values): p, m and v bit for bit, hi = nearest(p).
TEST(CudaSplitMaster, AdamWMatchesTheFp32KernelBitForBit) {
  MOP_REQUIRE_GPU();
  for (bool bf16_grads : {false, true}) {
    SCOPED_TRACE(bf16_grads ? "bf16 gradients" : "fp32 gradients");
    const size_t sizes[] = {1, 7, 4099, 70001};
    const size_t offsets[] = {0, 0, 1, 4};  // offset 1: the scalar path
    size_t total = 0;
    for (int i = 0; i < 4; ++i) total += sizes[i] + offsets[i];
    const std::vector<float> p0 = normals(total, 11, 0.5f);
    DeviceArray<float> d_p(p0), d_m(total), d_v(total), d_m2(total), d_v2(total), d_g(total), d_back(total);
    DeviceArray<bf16> d_hi(total), d_g16(total);
    DeviceArray<uint16_t> d_lo(total);
    cuda::split_master(d_hi.data(), d_lo.data(), d_p.data(), total, nullptr);
    for (int step = 1; step <= 3; ++step) {
      std::vector<float> g = normals(total, 100 + step, 1.f);
      if (bf16_grads)
        for (auto& x : g) x = round_bf16(x);
      d_g.upload(g);
      d_g16.upload(to_bf16(g));
      cuda::AdamWArgs a{
          1e-2f, 0.9f, 0.95f, 1e-8f, 0.f, float(1.0 - std::pow(0.9, step)), float(1.0 - std::pow(0.95, step)), 0.7f};
      std::vector<cuda::AdamWTensor> ref;
      std::vector<cuda::AdamWSplitTensor> split;
      size_t at = 0;
      for (int i = 0; i < 4; ++i) {
        at += offsets[i];
        const float wd = i % 2 ? 0.1f : 0.f;
        ref.push_back({d_p.data() + at, d_g.data() + at, d_m.data() + at, d_v.data() + at, nullptr, sizes[i], wd});
        const void* gp = bf16_grads ? static_cast<const void*>(d_g16.data() + at) : d_g.data() + at;
        split.push_back({d_hi.data() + at, d_lo.data() + at, gp, d_m2.data() + at, d_v2.data() + at, sizes[i], wd});
        at += sizes[i];
      }
      cuda::adamw_step_multi(ref.data(), int(ref.size()), a, nullptr);
      cuda::adamw_step_split_multi(split.data(), int(split.size()), bf16_grads, a, nullptr);
      cuda::merge_master(d_back.data(), d_hi.data(), d_lo.data(), total, nullptr);
      const std::vector<float> p = d_p.download();
      expect_bitwise(d_back.download(), p, "p");
      expect_bitwise(d_m2.download(), d_m.download(), "m");
      expect_bitwise(d_v2.download(), d_v.download(), "v");
      const std::vector<bf16> hi = d_hi.download();
      size_t bad = 0;
      for (size_t i = 0; i < total; ++i) bad += bf16_bits(hi[i]) != nearest_ties_down(p[i]);
      EXPECT_EQ(bad, 0u) << "step " << step;
    }
  }
}

TEST(CudaSplitMaster, SumSquaresOfBf16) {
  MOP_REQUIRE_GPU();
  const size_t n = (size_t(1) << 20) + 3;
  std::vector<float> g = normals(n, 5, 0.3f);
  double ref = 0;
  for (auto& x : g) x = round_bf16(x), ref += double(x) * double(x);
  DeviceArray<bf16> d_g(to_bf16(g));
  DeviceArray<float> scratch(cuda::sum_squares_scratch_floats(n));
  DeviceArray<double> d_out(1);
  cuda::sum_squares(d_out.data(), d_g.data(), n, scratch.data(), nullptr);
  EXPECT_NEAR(d_out.download()[0], ref, 1e-12 * ref);
}

namespace {
// dw starts from non-zero values (accumulation), the same on both sides.
struct GradPair {
  std::vector<float> init;
  DeviceArray<float> f32;
  DeviceArray<bf16> b16;
  explicit GradPair(size_t n, uint64_t seed)
      : init(random_bf16_values(n, seed, 0.05f)), f32(init), b16(to_bf16(init)) {}
  // order_atol: fp32 reduction-order noise where the two forms may run different algorithms.
  void compare(const char* what, double order_atol = 0) const {
    const std::vector<float> ref32 = f32.download();
    std::vector<float> ref(ref32.size());
    double mx = 0;
    for (size_t i = 0; i < ref.size(); ++i)
      ref[i] = round_bf16(ref32[i]), mx = std::max(mx, double(std::abs(ref32[i])));
    expect_close(to_f32(b16.download()), ref, 2 * kBf16Eps, 1e-6 * mx + order_atol, what);
  }
};
}  // namespace

TEST(CudaBf16Grads, WeightGradientKernelsRoundTheFp32SumOnce) {
  MOP_REQUIRE_GPU();
  const int N = 517, I = 96, O = 80, H = 4, hd = 32, V = 300;
  const DeviceArray<bf16> x(to_bf16(random_bf16_values(size_t(N) * I, 1))),
      dy(to_bf16(random_bf16_values(size_t(N) * O, 2)));
  const DeviceArray<bf16> w(to_bf16(random_bf16_values(size_t(O) * I, 3)));
  DeviceArray<bf16> dx(size_t(N) * I);
  {
    GradPair dw(size_t(O) * I, 4);
    cuda::matmul_backward(dx.data(), dw.f32.data(), dy.data(), x.data(), w.data(), N, I, O, nullptr);
    cuda::matmul_backward(nullptr, dw.b16.data(), dy.data(), x.data(), w.data(), N, I, O, nullptr);
    dw.compare("matmul dw", 1e-4 * std::sqrt(double(N)));
  }
  for (const char* backend : {"cutlass", "cublas"}) {
    cuda::set_grouped_gemm_backend(backend);
    const int E = 5;
    const std::vector<int32_t> off = {0, 100, 100, 350, 351, N};  // an empty expert and a one-row expert
    DeviceArray<int32_t> d_off(off);
    const DeviceArray<bf16> we(to_bf16(random_bf16_values(size_t(E) * O * I, 5)));
    GradPair dw(size_t(E) * O * I, 6);
    cuda::grouped_matmul_backward(dx.data(), dw.f32.data(), dy.data(), x.data(), we.data(), d_off.data(), off.data(), E,
                                  I, O, nullptr);
    cuda::grouped_matmul_backward(nullptr, dw.b16.data(), dy.data(), x.data(), we.data(), d_off.data(), off.data(), E,
                                  I, O, nullptr);
    dw.compare(backend, 1e-4 * std::sqrt(250.0));  // the largest expert has 250 rows
  }
  cuda::set_grouped_gemm_backend("cutlass");
  {
    const int D = I;
    DeviceArray<bf16> y(size_t(N) * D);
    DeviceArray<float> rstd(N), scratch(cuda::rmsnorm_backward_scratch_floats(N, D));
    const DeviceArray<bf16> g(to_bf16(random_bf16_values(D, 7)));
    cuda::rmsnorm_forward(y.data(), rstd.data(), x.data(), g.data(), N, D, 1e-6f, nullptr);
    GradPair dw(D, 8);
    cuda::rmsnorm_backward(dx.data(), dw.f32.data(), y.data(), x.data(), g.data(), rstd.data(), N, D, scratch.data(),
                           nullptr);
    cuda::rmsnorm_backward(dx.data(), dw.b16.data(), y.data(), x.data(), g.data(), rstd.data(), N, D, scratch.data(),
                           nullptr);
    dw.compare("rmsnorm dw");
  }
  {
    std::vector<int32_t> pos(N);
    for (int i = 0; i < N; ++i) pos[size_t(i)] = i % 200;
    DeviceArray<int32_t> d_pos(pos);
    const DeviceArray<bf16> in(to_bf16(random_bf16_values(size_t(N) * H * hd, 9))),
        qw(to_bf16(random_bf16_values(hd, 10)));
    DeviceArray<bf16> out(size_t(N) * H * hd), din(size_t(N) * H * hd);
    DeviceArray<float> rstd(size_t(N) * H), scratch(cuda::qk_norm_rope_backward_scratch_floats(N, H, hd));
    cuda::qk_norm_rope_forward(out.data(), rstd.data(), in.data(), qw.data(), d_pos.data(), N, H, hd, H * hd, 1e-6f,
                               1e6, nullptr);
    GradPair dw(hd, 11);
    cuda::qk_norm_rope_backward(din.data(), dw.f32.data(), out.data(), in.data(), qw.data(), rstd.data(), d_pos.data(),
                                N, H, hd, H * hd, 1e6, scratch.data(), nullptr);
    cuda::qk_norm_rope_backward(din.data(), dw.b16.data(), out.data(), in.data(), qw.data(), rstd.data(), d_pos.data(),
                                N, H, hd, H * hd, 1e6, scratch.data(), nullptr);
    dw.compare("qk_norm_rope dw");
  }
  {
    const int D = I;
    std::vector<int32_t> tok(N);
    for (int i = 0; i < N; ++i) tok[size_t(i)] = (i * 7) % 50;  // repeated tokens: runs to sum
    DeviceArray<int32_t> d_tok(tok);
    DeviceArray<char> ws(cuda::embedding_backward_workspace(N));
    GradPair dw(size_t(V) * D, 12);
    cuda::embedding_backward(dw.f32.data(), x.data(), d_tok.data(), N, D, V, ws.data(), ws.size(), nullptr);
    cuda::embedding_backward(dw.b16.data(), x.data(), d_tok.data(), N, D, V, ws.data(), ws.size(), nullptr);
    dw.compare("embedding dw");
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
