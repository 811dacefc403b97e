// cast_f32_to_bf16 / cast_bf16_to_f32 against the host conversions in core/dtype.h.
// Tolerance: none. Both directions are exact functions (round to nearest even, and widening), so
// every non-NaN output must match bit for bit; NaN must stay NaN.
#include "ops/cuda/cast.h"

#include <cstdio>
#include <limits>

#include "cuda_test_util.h"

using namespace mop;
using namespace mop::test;

namespace {

uint16_t bits(bf16 h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

// Random floats over many binades (not bf16-representable) plus the awkward values.
std::vector<float> awkward_floats(size_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> mant(-2.f, 2.f);
  std::uniform_int_distribution<int> expo(-140, 127);
  std::vector<float> v(n);
  for (auto& x : v) x = std::ldexp(mant(g), expo(g) / 2);  // magnitudes 2^-70 .. 2^64
  const float specials[] = {0.f,
                            -0.f,
                            1.f,
                            1.00390625f,  // 1 + 2^-8: a tie, rounds to even (1)
                            1.01171875f,  // 1 + 3 * 2^-8: a tie, rounds to even (1 + 2^-6)
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::max(),  // rounds to inf
                            std::numeric_limits<float>::denorm_min(),
                            1e-40f,
                            -3e38f};
  for (size_t i = 0; i < std::size(specials) && i < n; ++i) v[(i * 7919) % n] = specials[i];
  return v;
}

void check_f32_to_bf16(size_t n, size_t offset) {
  SCOPED_TRACE(::testing::Message() << "n=" << n << " offset=" << offset);
  const std::vector<float> x = awkward_floats(n, n + 17);
  std::vector<float> padded(offset, 0.f);
  padded.insert(padded.end(), x.begin(), x.end());
  DeviceArray<float> d_in(padded);
  DeviceArray<bf16> d_out(n + offset);
  cuda::cast_f32_to_bf16(d_out.data() + offset, d_in.data() + offset, n, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<bf16> got = d_out.download();
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint16_t g = bits(got[offset + i]), want = f32_to_bf16(x[i]);
    const bool ok = std::isnan(x[i]) ? std::isnan(bf16_to_f32(g)) : g == want;
    if (!ok && bad++ < 5) ADD_FAILURE() << "i=" << i << " x=" << x[i] << " got 0x" << std::hex << g << " want 0x" << want;
  }
  EXPECT_EQ(bad, 0u);
}

void check_bf16_to_f32(size_t n, size_t offset) {
  SCOPED_TRACE(::testing::Message() << "n=" << n << " offset=" << offset);
  std::vector<float> x = awkward_floats(n, n + 29);
  for (auto& v : x) v = round_bf16(v);
  std::vector<float> padded(offset, 0.f);
  padded.insert(padded.end(), x.begin(), x.end());
  DeviceArray<bf16> d_in(to_bf16(padded));
  DeviceArray<float> d_out(n + offset);
  cuda::cast_bf16_to_f32(d_out.data() + offset, d_in.data() + offset, n, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = d_out.download();
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    const bool ok = std::isnan(x[i]) ? std::isnan(got[offset + i]) : std::memcmp(&got[offset + i], &x[i], 4) == 0;
    if (!ok && bad++ < 5) ADD_FAILURE() << "i=" << i << " got " << got[offset + i] << " want " << x[i];
  }
  EXPECT_EQ(bad, 0u);
}

const size_t kSizes[] = {1, 7, 37, 300, 1001, (1u << 20) + 3};

}  // namespace

TEST(CudaCast, F32ToBf16MatchesHostRounding) {
  MOP_REQUIRE_GPU();
  for (size_t n : kSizes) {
    check_f32_to_bf16(n, 0);  // aligned: vector path (plus a tail when n % 4 != 0)
    check_f32_to_bf16(n, 1);  // misaligned: scalar path
  }
}

TEST(CudaCast, Bf16ToF32IsExact) {
  MOP_REQUIRE_GPU();
  for (size_t n : kSizes) {
    check_bf16_to_f32(n, 0);
    check_bf16_to_f32(n, 3);
  }
}

TEST(CudaCast, ZeroLengthIsANoOp) {
  MOP_REQUIRE_GPU();
  cuda::cast_f32_to_bf16(nullptr, nullptr, 0, nullptr);
  cuda::cast_bf16_to_f32(nullptr, nullptr, 0, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

// Informative only: prints the achieved bandwidth, never fails on speed.
TEST(CudaCast, Bandwidth) {
  MOP_REQUIRE_GPU();
  const size_t n = size_t(16384) * 2048;
  DeviceArray<float> f(n);
  DeviceArray<bf16> h(n);
  const double down = median_ms([&] { cuda::cast_f32_to_bf16(h.data(), f.data(), n, nullptr); });
  const double up = median_ms([&] { cuda::cast_bf16_to_f32(f.data(), h.data(), n, nullptr); });
  std::printf("[cast n=%zu] f32->bf16 %.3f ms %.0f GB/s, bf16->f32 %.3f ms %.0f GB/s\n", n, down,
              6.0 * n / (down * 1e6), up, 6.0 * n / (up * 1e6));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
