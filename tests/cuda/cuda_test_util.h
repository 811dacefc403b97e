// Helpers for CUDA op tests: device arrays, bf16 rounding, a dtype-aware comparison, and the
// event timer the benchmarks share (`mop bench ops` uses the same one).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ops/cuda/event_timer.h"
#include "core/dtype.h"
#include "cuda_check.h"

namespace mop::test {

using bf16 = __nv_bfloat16;

inline float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }
inline std::vector<bf16> to_bf16(const std::vector<float>& x) {
  std::vector<bf16> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint16_t h = f32_to_bf16(x[i]);
    std::memcpy(&out[i], &h, 2);
  }
  return out;
}
inline std::vector<float> to_f32(const std::vector<bf16>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, &x[i], 2);
    out[i] = bf16_to_f32(h);
  }
  return out;
}
// Random values in [-scale, scale], already rounded to bf16 so the CPU reference sees exactly
// what the GPU sees.
// n draws of N(0, sd^2), seeded.
inline std::vector<float> normals(size_t n, uint64_t seed, float sd) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

inline std::vector<float> random_bf16_values(size_t n, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = round_bf16(u(g));
  return v;
}

// Owning device array of T (tests only; the engine uses Buffer).
template <class T> class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : n_(n) {
    if (n) EXPECT_EQ(cudaMalloc(&p_, n * sizeof(T)), cudaSuccess);
    if (n) cudaMemset(p_, 0, n * sizeof(T));
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() {
    if (p_) cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* data() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    ASSERT_EQ(host.size(), n_);
    if (n_) ASSERT_EQ(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    cudaDeviceSynchronize();
    if (n_) EXPECT_EQ(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// |got - ref| <= rtol * |ref| + atol for every element; reports the first failure and the worst.
// For bf16 outputs use rtol = k * 2^-8 (bf16 epsilon) with k covering the accumulation depth.
inline void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double rtol, double atol,
                         const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  size_t bad = 0, first = SIZE_MAX, worst_i = 0;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::abs(double(got[i]) - double(ref[i]));
    const double lim = rtol * std::abs(double(ref[i])) + atol;
    if (!(err <= lim)) {
      ++bad;
      if (first == SIZE_MAX) first = i;
    }
    if (err / (lim > 0 ? lim : 1) > worst) worst = err / (lim > 0 ? lim : 1), worst_i = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements out of tolerance; first at " << first
                     << " (got " << (first < got.size() ? got[first] : 0) << ", ref "
                     << (first < ref.size() ? ref[first] : 0) << "); worst at " << worst_i << " (got " << got[worst_i]
                     << ", ref " << ref[worst_i] << ")";
}

constexpr double kBf16Eps = 1.0 / 256;  // 2^-8: spacing of bf16 just above 1

// Median ms per call of f() on the default stream, after `warmup` calls (ops/cuda/event_timer.h).
using ::mop::cuda::median_ms;

}  // namespace mop::test
