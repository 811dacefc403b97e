// Shared helpers for the CPU op tests: a deterministic RNG, tolerance checks against fp64
// references, central finite differences and bit-exact comparison.
//
// Tolerances (one place, so every op is held to the same standard):
//  - Forward vs a naive fp64 reference, per element:
//        |got - ref| <= factor * eps(T) * (|ref| + 1) * sqrt(K)
//    where K is the length of the reduction behind that element (1 for elementwise ops) and
//    factor defaults to 8. Inputs are O(1), so the "+1" covers cancellation in sums whose terms
//    are larger than their result.
//  - Backward vs central finite differences in fp64 (h = 1e-6) of a scalar loss L, per element:
//        |analytic - numeric| <= 1e-6 * max(1, |numeric|)
//    (relative error below 1e-6, absolute below 1e-6 for gradients smaller than 1).
//  - fp32 vs fp64 instantiation: the forward rule above with T = float.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <omp.h>

#include "core/error.h"

namespace opcheck {

using Vec = std::vector<double>;

// Values are rounded to float on creation so the fp32 and fp64 instantiations see the same inputs.
class Rand {
 public:
  explicit Rand(uint64_t seed = 0x5eed) : gen_(seed) {}
  double normal(double scale = 1.0) { return double(float(scale * norm_(gen_))); }
  double uniform(double lo, double hi) {
    return double(float(lo + (hi - lo) * std::uniform_real_distribution<double>(0.0, 1.0)(gen_)));
  }
  int32_t below(int32_t n) { return int32_t(gen_() % uint64_t(n)); }
  Vec normals(size_t n, double scale = 1.0) {
    Vec v(n);
    for (auto& x : v) x = normal(scale);
    return v;
  }
  std::vector<int32_t> ints(size_t n, int32_t hi) {  // uniform in [0, hi)
    std::vector<int32_t> v(n);
    for (auto& x : v) x = below(hi);
    return v;
  }

 private:
  std::mt19937_64 gen_;
  std::normal_distribution<double> norm_{0.0, 1.0};
};

template <class T> std::vector<T> to(const Vec& v) { return std::vector<T>(v.begin(), v.end()); }
template <class T> Vec to_double(const std::vector<T>& v) { return Vec(v.begin(), v.end()); }

// Output buffers pre-filled with NaN: a "written" output that is accidentally accumulated shows up.
template <class T> std::vector<T> nans(size_t n) { return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN()); }

inline double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
inline Vec sub(const Vec& a, const Vec& b) {
  Vec r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}

// got (type T) against an fp64 reference, with the forward tolerance above.
template <class T>
::testing::AssertionResult close(const std::vector<T>& got, const Vec& ref, double K = 1, double factor = 8) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs reference " << ref.size();
  const double eps = std::numeric_limits<T>::epsilon();
  size_t bad = 0;
  std::ostringstream os;
  os.precision(17);
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = double(got[i]), r = ref[i];
    const double tol = factor * eps * (std::abs(r) + 1) * std::sqrt(std::max(K, 1.0));
    if (!(std::abs(g - r) <= tol)) {
      if (bad < 5) os << "\n  [" << i << "] got " << g << " ref " << r << " diff " << g - r << " tol " << tol;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements outside tolerance" << os.str();
}

// Central finite differences of loss() with respect to every element of x (perturbed in place and
// restored), compared with the analytic gradient.
inline ::testing::AssertionResult fd_check(Vec& x, const Vec& analytic, const std::function<double()>& loss,
                                           double h = 1e-6, double tol = 1e-6) {
  if (x.size() != analytic.size())
    return ::testing::AssertionFailure() << "size " << analytic.size() << " vs input " << x.size();
  size_t bad = 0;
  double worst = 0;
  std::ostringstream os;
  os.precision(17);
  for (size_t i = 0; i < x.size(); ++i) {
    const double xi = x[i];
    x[i] = xi + h;
    const double lp = loss();
    x[i] = xi - h;
    const double lm = loss();
    x[i] = xi;
    const double num = (lp - lm) / (2 * h);
    const double err = std::abs(analytic[i] - num) / std::max(1.0, std::abs(num));
    worst = std::max(worst, err);
    if (!(err < tol)) {
      if (bad < 5) os << "\n  [" << i << "] analytic " << analytic[i] << " numeric " << num;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << x.size() << " gradients off (worst relative error "
                                       << worst << ")" << os.str();
}

template <class T> ::testing::AssertionResult same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  if (!a.empty() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) != 0)
    return ::testing::AssertionFailure() << "results differ bitwise";
  return ::testing::AssertionSuccess();
}

// Runs f with n OpenMP threads, restoring the previous setting (determinism across thread counts).
template <class F> void with_threads(int n, F&& f) {
  const int old = omp_get_max_threads();
  omp_set_num_threads(n);
  f();
  omp_set_num_threads(old);
}

// Runs f and checks it throws mop::Error whose message contains every one of `needles`.
template <class F> ::testing::AssertionResult throws_naming(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const mop::Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles)
      if (msg.find(n) == std::string::npos)
        return ::testing::AssertionFailure() << "message \"" << msg << "\" does not name " << n;
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no mop::Error thrown";
}

}  // namespace opcheck
