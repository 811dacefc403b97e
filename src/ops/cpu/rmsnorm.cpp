#include "ops/cpu/rmsnorm.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace mop::cpu {

template <class T> void rmsnorm_forward(T* y_ND, T* rstd_N, const T* x_ND, const T* w_D, int N, int D, T eps) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* x = x_ND + size_t(n) * D;
    T* y = y_ND + size_t(n) * D;
    double ss = 0;
    for (int d = 0; d < D; ++d) ss += double(x[d]) * x[d];
    const T r = T(1.0 / std::sqrt(ss / D + double(eps)));
    rstd_N[n] = r;
    for (int d = 0; d < D; ++d) y[d] = x[d] * r * w_D[d];
  }
}

// y_j = x_j r w_j with r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / D, so
// dx_j = r (w_j dy_j - x_j r^2 (sum_i dy_i w_i x_i) / D).
template <class T>
void rmsnorm_backward(T* dx_ND, T* dw_D, const T* dy_ND, const T* x_ND, const T* w_D, const T* rstd_N, int N, int D) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* x = x_ND + size_t(n) * D;
    const T* dy = dy_ND + size_t(n) * D;
    T* dx = dx_ND + size_t(n) * D;
    const double r = rstd_N[n];
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += double(dy[d]) * w_D[d] * x[d];
    const double c = r * r * dot / D;
    for (int d = 0; d < D; ++d) dx[d] = T(r * (double(w_D[d]) * dy[d] - double(x[d]) * c));
  }
  // dw sums over tokens: threads own column blocks so the order over n is fixed.
  constexpr int kBlock = 64;
  const int n_blocks = (D + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int b = 0; b < n_blocks; ++b) {
    const int d0 = b * kBlock, d1 = std::min(D, d0 + kBlock);
    double acc[kBlock] = {};
    for (int n = 0; n < N; ++n) {
      const T* x = x_ND + size_t(n) * D;
      const T* dy = dy_ND + size_t(n) * D;
      const double r = rstd_N[n];
      for (int d = d0; d < d1; ++d) acc[d - d0] += double(dy[d]) * x[d] * r;
    }
    for (int d = d0; d < d1; ++d) dw_D[d] += T(acc[d - d0]);
  }
}

template void rmsnorm_forward<float>(float*, float*, const float*, const float*, int, int, float);
template void rmsnorm_forward<double>(double*, double*, const double*, const double*, int, int, double);
template void rmsnorm_backward<float>(float*, float*, const float*, const float*, const float*, const float*, int, int);
template void rmsnorm_backward<double>(double*, double*, const double*, const double*, const double*, const double*, int,
                                       int);

}  // namespace mop::cpu
