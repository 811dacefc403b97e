#include "ops/cpu/moe_permute.h"

#include <algorithm>
#include <cstddef>
#include <vector>

#include "core/error.h"

namespace mop::cpu {

void moe_route_layout(int32_t* row_NK, int32_t* offsets_E1, const int32_t* idx_NK, int N, int E, int K) {
  MOP_CHECK(N >= 0 && E > 0 && K >= 0, "moe_route_layout: bad sizes N={} E={} K={}", N, E, K);
  const size_t M = size_t(N) * K;
  std::fill_n(offsets_E1, E + 1, 0);
  for (size_t a = 0; a < M; ++a) {
    const int32_t e = idx_NK[a];
    MOP_CHECK(e >= 0 && e < E, "moe_route_layout: expert id {} of token {} (slot {}) not in [0, {})", e, a / K, a % K,
              E);
    ++offsets_E1[e + 1];
  }
  for (int e = 0; e < E; ++e) offsets_E1[e + 1] += offsets_E1[e];
  // Stable counting sort: walking assignments in (token, slot) order keeps token order per expert.
  std::vector<int32_t> next(offsets_E1, offsets_E1 + E);
  for (size_t a = 0; a < M; ++a) row_NK[a] = next[idx_NK[a]]++;
}

template <class T> void moe_permute(T* xp_MD, const T* x_ND, const int32_t* row_NK, int N, int K, int D) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k)
      std::copy_n(x_ND + size_t(n) * D, D, xp_MD + size_t(row_NK[size_t(n) * K + k]) * D);
}

template <class T> void moe_permute_backward(T* dx_ND, const T* dxp_MD, const int32_t* row_NK, int N, int K, int D) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const int32_t* rows = row_NK + size_t(n) * K;
    T* dx = dx_ND + size_t(n) * D;
    for (int d = 0; d < D; ++d) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += double(dxp_MD[size_t(rows[k]) * D + d]);
      dx[d] = T(s);
    }
  }
}

template <class T>
void moe_combine(T* y_ND, const T* yp_MD, const T* w_NK, const int32_t* row_NK, int N, int K, int D) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const int32_t* rows = row_NK + size_t(n) * K;
    const T* w = w_NK + size_t(n) * K;
    T* y = y_ND + size_t(n) * D;
    for (int d = 0; d < D; ++d) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += double(w[k]) * yp_MD[size_t(rows[k]) * D + d];
      y[d] = T(s);
    }
  }
}

template <class T>
void moe_combine_backward(T* dyp_MD, T* dw_NK, const T* dy_ND, const T* yp_MD, const T* w_NK, const int32_t* row_NK,
                          int N, int K, int D) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* dy = dy_ND + size_t(n) * D;
    for (int k = 0; k < K; ++k) {
      const size_t row = size_t(row_NK[size_t(n) * K + k]);
      const T* yp = yp_MD + row * D;
      T* dyp = dyp_MD + row * D;
      const double w = w_NK[size_t(n) * K + k];
      double dot = 0;
      for (int d = 0; d < D; ++d) {
        dot += double(dy[d]) * yp[d];
        dyp[d] = T(w * dy[d]);
      }
      dw_NK[size_t(n) * K + k] = T(dot);
    }
  }
}

template void moe_permute<float>(float*, const float*, const int32_t*, int, int, int);
template void moe_permute<double>(double*, const double*, const int32_t*, int, int, int);
template void moe_permute_backward<float>(float*, const float*, const int32_t*, int, int, int);
template void moe_permute_backward<double>(double*, const double*, const int32_t*, int, int, int);
template void moe_combine<float>(float*, const float*, const float*, const int32_t*, int, int, int);
template void moe_combine<double>(double*, const double*, const double*, const int32_t*, int, int, int);
template void moe_combine_backward<float>(float*, float*, const float*, const float*, const float*, const int32_t*, int,
                                          int, int);
template void moe_combine_backward<double>(double*, double*, const double*, const double*, const double*,
                                           const int32_t*, int, int, int);

}  // namespace mop::cpu
