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
