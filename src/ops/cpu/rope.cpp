#include "ops/cpu/rope.h"

#include <cmath>
#include <vector>

#include "core/error.h"

namespace mop::cpu {

namespace {
// sign = +1 rotates by +angle (forward), -1 by -angle (the transpose, for backward).
// Both halves of a pair are read before either is written, so in and out may alias.
template <class T>
void rotate(T* out_NHd, const T* in_NHd, const int32_t* pos_N, int N, int H, int hd, double theta, double sign) {
  MOP_CHECK(hd % 2 == 0, "rope: head_dim {} must be even", hd);
  const int half = hd / 2;
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(theta, -2.0 * i / hd);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    for (int i = 0; i < half; ++i) {
      const double a = double(pos_N[n]) * inv_freq[i];
      const double c = std::cos(a), s = sign * std::sin(a);
      for (int h = 0; h < H; ++h) {
        const size_t base = (size_t(n) * H + h) * hd;
        const double x0 = in_NHd[base + i], x1 = in_NHd[base + i + half];
        out_NHd[base + i] = T(x0 * c - x1 * s);
        out_NHd[base + i + half] = T(x1 * c + x0 * s);
      }
    }
  }
}
}  // namespace

template <class T>
void rope_forward(T* out_NHd, const T* in_NHd, const int32_t* pos_N, int N, int H, int hd, double theta) {
  rotate(out_NHd, in_NHd, pos_N, N, H, hd, theta, 1.0);
}

template <class T>
void rope_backward(T* din_NHd, const T* dout_NHd, const int32_t* pos_N, int N, int H, int hd, double theta) {
  rotate(din_NHd, dout_NHd, pos_N, N, H, hd, theta, -1.0);
}

template void rope_forward<float>(float*, const float*, const int32_t*, int, int, int, double);
template void rope_forward<double>(double*, const double*, const int32_t*, int, int, int, double);
template void rope_backward<float>(float*, const float*, const int32_t*, int, int, int, double);
template void rope_backward<double>(double*, const double*, const int32_t*, int, int, int, double);

}  // namespace mop::cpu
