#include "cuda_test_util.h"
#include "ops/cuda/elementwise.h"

using namespace mop;
using namespace mop::test;

TEST(CudaElementwise, AddMatchesFp32SumRoundedToBf16) {
  MOP_REQUIRE_GPU();
  for (size_t n : {size_t(1), size_t(7), size_t(64), size_t(1001), size_t(1 << 20)}) {
    auto a = random_bf16_values(n, 1), b = random_bf16_values(n, 2);
    DeviceArray<bf16> da(to_bf16(a)), db(to_bf16(b)), dout(n);
    cuda::add_bf16(dout.data(), da.data(), db.data(), n, nullptr);
    std::vector<float> ref(n);
    for (size_t i = 0; i < n; ++i) ref[i] = round_bf16(a[i] + b[i]);
    // Exact: one fp32 add of bf16 values, then the same round-to-nearest-even.
    expect_close(to_f32(dout.download()), ref, 0, 0, "add n=" + std::to_string(n));
    // In place: out aliases a.
    cuda::add_bf16(da.data(), da.data(), db.data(), n, nullptr);
    expect_close(to_f32(da.download()), ref, 0, 0, "add in place");
  }
}

TEST(CudaElementwise, AccumulateIntoF32) {
  MOP_REQUIRE_GPU();
  const size_t n = 333;
  auto a = random_bf16_values(n, 3);
  std::vector<float> init(n, 0.5f), ref(n);
  for (size_t i = 0; i < n; ++i) ref[i] = 0.5f + a[i];
  DeviceArray<bf16> da(to_bf16(a));
  DeviceArray<float> out(init);
  cuda::accumulate_bf16_into_f32(out.data(), da.data(), n, nullptr);
  expect_close(out.download(), ref, 0, 0, "accumulate");
}

// Both paths: 16-byte vectors (width, strides and pointers in multiples of 8 elements) and single
// elements (odd widths or offsets), against a host copy; what lies outside the block is untouched.
TEST(CudaElementwise, CopyRowsMatchesHostCopy) {
  MOP_REQUIRE_GPU();
  struct Case {
    size_t N, width, src_stride, src_off, dst_stride, dst_off;
  };
  for (const Case& c : {Case{37, 24, 72, 24, 24, 0}, Case{1000, 512, 3072, 2560, 512, 0},
                        Case{19, 13, 40, 5, 31, 3}, Case{1, 8, 8, 0, 16, 8}, Case{64, 7, 7, 0, 9, 1}}) {
    const size_t src_n = c.N * c.src_stride, dst_n = c.N * c.dst_stride;
    auto s = random_bf16_values(src_n, 11), d0 = random_bf16_values(dst_n, 12);
    DeviceArray<bf16> src(to_bf16(s)), dst(to_bf16(d0));
    cuda::copy_rows_bf16(dst.data() + c.dst_off, c.dst_stride, src.data() + c.src_off, c.src_stride, c.N, c.width,
                         nullptr);
    std::vector<float> ref = to_f32(to_bf16(d0));
    const std::vector<float> sr = to_f32(to_bf16(s));
    for (size_t n = 0; n < c.N; ++n)
      for (size_t j = 0; j < c.width; ++j) ref[c.dst_off + n * c.dst_stride + j] = sr[c.src_off + n * c.src_stride + j];
    expect_close(to_f32(dst.download()), ref, 0, 0,
                 "copy_rows N=" + std::to_string(c.N) + " width=" + std::to_string(c.width));
  }
}
