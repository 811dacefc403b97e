// qk_norm_rope_{forward,backward} against mop::cpu::rmsnorm_* (over N*H rows of hd) followed by
// mop::cpu::rope_* (fp64 angles and math, fp32 results) on the same bf16-representable inputs.
// Tolerances:
//  - bf16 outputs (out, din): |got - ref| <= 2 kBf16Eps |ref| + 1e-5: one rounding to bf16 plus
//    fp32 evaluation error (cos/sin rounded to fp32, y0 c - y1 s may cancel: ~1e-7 on O(1) terms).
//  - rstd (fp32): 1e-5 relative.
//  - dw (fp32, accumulated onto a non-zero start): 1e-4 x max |dw_ref| absolute.
//  - Padding between rows (row_stride > H hd) must be left bit-for-bit untouched.
#include "ops/cpu/rmsnorm.h"
#include "ops/cpu/rope.h"
#include "ops/cuda/rope.h"

#include <algorithm>
#include <cstdio>

#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;

namespace {

constexpr float kEps = 1e-6f;
constexpr double kTheta = 1e6;
constexpr double kRtol = 2 * kBf16Eps, kAtol = 1e-5;

struct Case {
  int N, H, hd, pad;  // row_stride = H hd + pad
};
// Paths: hd in {64, 128, 256} with row_stride % 8 == 0 takes the 16-byte path (several heads per
// warp, some slots idle when H is small); other even strides with hd % 4 == 0 the 4-byte path;
// the rest the scalar path.
const Case kCases[] = {{1, 1, 2, 0},     {7, 3, 6, 5},      {37, 5, 10, 1},   {7, 5, 12, 0},
                       {37, 3, 64, 2},   {37, 4, 64, 0},    {4099, 2, 64, 64}, {300, 16, 128, 0},
                       {37, 5, 128, 0},  {300, 2, 128, 256}, {300, 2, 128, 3}, {7, 1, 256, 0}};

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::abs(x)));
  return m;
}
// Packed documents: positions restart at 0 at random boundaries; one document starts far out.
std::vector<int32_t> make_pos(int N, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int32_t> pos(N);
  int32_t p = 40000;
  for (int n = 0; n < N; ++n) {
    if (n > 0 && g() % 29 == 0) p = 0;
    pos[n] = p++;
  }
  return pos;
}
// The [N, H hd] part of a [N, row_stride] buffer, and back.
std::vector<float> compact(const std::vector<float>& strided, const Case& c) {
  const int row = c.H * c.hd, stride = row + c.pad;
  std::vector<float> out(size_t(c.N) * row);
  for (int n = 0; n < c.N; ++n)
    std::copy_n(strided.begin() + size_t(n) * stride, row, out.begin() + size_t(n) * row);
  return out;
}
// Checks the padding of a strided result equals the original and returns the compact part.
std::vector<float> compact_checked(const std::vector<float>& got, const std::vector<float>& original, const Case& c,
                                   const char* what) {
  const int row = c.H * c.hd, stride = row + c.pad;
  for (int n = 0; n < c.N; ++n)
    for (int j = row; j < stride; ++j)
      if (std::memcmp(&got[size_t(n) * stride + j], &original[size_t(n) * stride + j], 4) != 0) {
        ADD_FAILURE() << what << ": padding written at token " << n << " column " << j;
        return compact(got, c);
      }
  return compact(got, c);
}

// norm: with QK-norm (else RoPE only); in_place: out is the input buffer.
void check_forward(const Case& c, bool norm, bool in_place) {
  SCOPED_TRACE(::testing::Message() << "N=" << c.N << " H=" << c.H << " hd=" << c.hd << " pad=" << c.pad
                                    << " norm=" << norm << " in_place=" << in_place);
  const int stride = c.H * c.hd + c.pad, rows = c.N * c.H;
  const std::vector<float> in = random_bf16_values(size_t(c.N) * stride, c.N * 7 + c.hd, 2.f);
  std::vector<float> w = random_bf16_values(c.hd, c.hd, 0.25f);
  for (auto& x : w) x = round_bf16(1.f + x);
  const std::vector<int32_t> pos = make_pos(c.N, c.N + c.H);
  const std::vector<float> x = compact(in, c);
  std::vector<float> y = x, rstd_ref(rows), out_ref(x.size());
  if (norm) cpu::rmsnorm_forward<float>(y.data(), rstd_ref.data(), x.data(), w.data(), rows, c.hd, kEps);
  cpu::rope_forward<float>(out_ref.data(), y.data(), pos.data(), c.N, c.H, c.hd, kTheta);

  const std::vector<float> out0 = random_bf16_values(in.size(), 5);  // what the padding must keep
  DeviceArray<bf16> d_in(to_bf16(in)), d_out(to_bf16(in_place ? in : out0)), d_w(to_bf16(w));
  DeviceArray<int32_t> d_pos(pos);
  DeviceArray<float> d_rstd(rows);
  bf16* out = in_place ? d_in.data() : d_out.data();
  cuda::qk_norm_rope_forward(out, norm ? d_rstd.data() : nullptr, d_in.data(), norm ? d_w.data() : nullptr,
                             d_pos.data(), c.N, c.H, c.hd, stride, kEps, kTheta, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = to_f32((in_place ? d_in : d_out).download());
  expect_close(compact_checked(got, in_place ? in : out0, c, "out"), out_ref, kRtol, kAtol, "out");
  if (norm) expect_close(d_rstd.download(), rstd_ref, 1e-5, 0, "rstd");
}

struct Backward {
  std::vector<float> din, dw;  // din strided, as the op writes it
};
struct BackwardInputs {
  std::vector<float> dout, in, w, rstd, dw0, din0;
  std::vector<int32_t> pos;
};
BackwardInputs make_backward_inputs(const Case& c) {
  const int stride = c.H * c.hd + c.pad, rows = c.N * c.H;
  BackwardInputs b;
  b.dout = random_bf16_values(size_t(c.N) * stride, c.N + 11 * c.hd);
  b.in = random_bf16_values(b.dout.size(), c.N + 13 * c.hd, 2.f);
  b.w = random_bf16_values(c.hd, c.hd + 1, 0.25f);
  for (auto& x : b.w) x = round_bf16(1.f + x);
  b.dw0 = random_bf16_values(c.hd, 17, 3.f);
  b.din0 = random_bf16_values(b.dout.size(), 19);
  b.pos = make_pos(c.N, c.N * 3 + c.hd);
  std::vector<float> y(size_t(rows) * c.hd), x = compact(b.in, c);
  b.rstd.resize(rows);
  cpu::rmsnorm_forward<float>(y.data(), b.rstd.data(), x.data(), b.w.data(), rows, c.hd, kEps);
  return b;
}
Backward gpu_backward(const BackwardInputs& b, const Case& c, bool norm) {
  const int stride = c.H * c.hd + c.pad;
  DeviceArray<bf16> d_dout(to_bf16(b.dout)), d_in(to_bf16(b.in)), d_w(to_bf16(b.w)), d_din(to_bf16(b.din0));
  DeviceArray<float> d_rstd(b.rstd), d_dw(b.dw0), scratch(cuda::qk_norm_rope_backward_scratch_floats(c.N, c.H, c.hd));
  DeviceArray<int32_t> d_pos(b.pos);
  cuda::qk_norm_rope_backward(d_din.data(), norm ? d_dw.data() : nullptr, d_dout.data(), d_in.data(),
                              norm ? d_w.data() : nullptr, norm ? d_rstd.data() : nullptr, d_pos.data(), c.N, c.H,
                              c.hd, stride, kTheta, norm ? scratch.data() : nullptr, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {to_f32(d_din.download()), d_dw.download()};
}

void check_backward(const Case& c, bool norm) {
  SCOPED_TRACE(::testing::Message() << "N=" << c.N << " H=" << c.H << " hd=" << c.hd << " pad=" << c.pad
                                    << " norm=" << norm);
  const int rows = c.N * c.H;
  const BackwardInputs b = make_backward_inputs(c);
  const std::vector<float> dout = compact(b.dout, c), x = compact(b.in, c);
  std::vector<float> dy(dout.size()), din_ref(dout.size()), dw_ref = b.dw0;
  cpu::rope_backward<float>(dy.data(), dout.data(), b.pos.data(), c.N, c.H, c.hd, kTheta);
  if (norm) {
    cpu::rmsnorm_backward<float>(din_ref.data(), dw_ref.data(), dy.data(), x.data(), b.w.data(), b.rstd.data(), rows,
                                 c.hd);
  } else {
    din_ref = dy;
  }
  const Backward got = gpu_backward(b, c, norm);
  expect_close(compact_checked(got.din, b.din0, c, "din"), din_ref, kRtol, kAtol, "din");
  if (norm) expect_close(got.dw, dw_ref, 0, 1e-4 * max_abs(dw_ref), "dw");
}

}  // namespace

TEST(CudaRope, ForwardMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (const Case& c : kCases) {
    check_forward(c, true, false);
    check_forward(c, false, false);  // RoPE only
  }
}

TEST(CudaRope, ForwardInPlace) {
  MOP_REQUIRE_GPU();
  check_forward({37, 4, 64, 0}, true, true);
  check_forward({300, 2, 128, 256}, true, true);
  check_forward({7, 3, 6, 5}, false, true);
}

TEST(CudaRope, BackwardMatchesCpu) {
  MOP_REQUIRE_GPU();
  for (const Case& c : kCases) {
    check_backward(c, true);
    check_backward(c, false);
  }
}

TEST(CudaRope, BackwardDeterministic) {
  MOP_REQUIRE_GPU();
  for (const Case& c : {Case{4099, 2, 64, 64}, Case{300, 3, 6, 1}}) {
    const BackwardInputs b = make_backward_inputs(c);
    const Backward r1 = gpu_backward(b, c, true), r2 = gpu_backward(b, c, true);
    EXPECT_EQ(std::memcmp(r1.din.data(), r2.din.data(), r1.din.size() * 4), 0) << "din N=" << c.N;
    EXPECT_EQ(std::memcmp(r1.dw.data(), r2.dw.data(), r1.dw.size() * 4), 0) << "dw N=" << c.N;
  }
}

// Informative only: prints the achieved bandwidth, never fails on speed. q of a fused qkv
// buffer: H = 16 query heads, 4 KV heads, hd = 128.
TEST(CudaRope, Bandwidth) {
  MOP_REQUIRE_GPU();
  const int N = 16384, H = 16, KVH = 4, hd = 128, stride = (H + 2 * KVH) * hd;
  const size_t elems = size_t(N) * stride;
  DeviceArray<bf16> qkv(elems), out(elems), dqkv(elems), w(to_bf16(std::vector<float>(hd, 1.f)));
  DeviceArray<float> rstd(std::vector<float>(size_t(N) * H, 1.f)), dw(hd),
      scratch(cuda::qk_norm_rope_backward_scratch_floats(N, H, hd));
  DeviceArray<int32_t> pos(make_pos(N, 1));
  const double fwd = median_ms([&] {
    cuda::qk_norm_rope_forward(out.data(), rstd.data(), qkv.data(), w.data(), pos.data(), N, H, hd, stride, kEps,
                               kTheta, nullptr);
  });
  const double bwd = median_ms([&] {
    cuda::qk_norm_rope_backward(dqkv.data(), dw.data(), out.data(), qkv.data(), w.data(), rstd.data(), pos.data(), N,
                                H, hd, stride, kTheta, scratch.data(), nullptr);
  });
  // Bytes: forward reads in, writes out; backward reads dout, in, writes din (bf16, N H hd each).
  const double b = 2.0 * N * H * hd;
  std::printf("[qk_norm_rope N=%d H=%d hd=%d] forward %.3f ms %.0f GB/s, backward %.3f ms %.0f GB/s\n", N, H, hd, fwd,
              2 * b / (fwd * 1e6), bwd, 3 * b / (bwd * 1e6));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
