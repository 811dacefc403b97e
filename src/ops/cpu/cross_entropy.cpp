#include "ops/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "core/error.h"

namespace mop::cpu {

namespace {
void check_targets(const int32_t* targets_N, int N, int V) {
  for (int n = 0; n < N; ++n)
    MOP_CHECK(targets_N[n] < V, "cross_entropy: target {} at row {} is >= vocabulary size {}", targets_N[n], n, V);
}
}  // namespace

template <class T>
double cross_entropy_forward(T* loss_N, T* lse_N, const T* logits_NV, const int32_t* targets_N, int N, int V) {
  check_targets(targets_N, N, V);
  std::vector<double> loss(N, 0.0);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    if (targets_N[n] < 0) {
      loss_N[n] = T(0), lse_N[n] = T(0);
      continue;
    }
    const T* l = logits_NV + size_t(n) * V;
    double m = -INFINITY, sum = 0;
    for (int v = 0; v < V; ++v) m = std::max(m, double(l[v]));
    for (int v = 0; v < V; ++v) sum += std::exp(double(l[v]) - m);
    const double lse = m + std::log(sum);
    loss[n] = lse - double(l[targets_N[n]]);
    loss_N[n] = T(loss[n]);
    lse_N[n] = T(lse);
  }
  // Summed serially after the parallel loop so the total does not depend on the thread count.
  double total = 0;
  for (int n = 0; n < N; ++n) total += loss[n];
  return total;
}

template <class T>
void cross_entropy_backward(T* dlogits_NV, const T* logits_NV, const T* lse_N, const int32_t* targets_N, T dscale, int N,
                            int V) {
  check_targets(targets_N, N, V);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    T* dl = dlogits_NV + size_t(n) * V;
    const int32_t t = targets_N[n];
    if (t < 0) {
      std::fill_n(dl, V, T(0));
      continue;
    }
    const T* l = logits_NV + size_t(n) * V;
    const double lse = lse_N[n], s = dscale;
    for (int v = 0; v < V; ++v) dl[v] = T(s * std::exp(double(l[v]) - lse));
    dl[t] = T(s * (std::exp(double(l[t]) - lse) - 1.0));
  }
}

template double cross_entropy_forward<float>(float*, float*, const float*, const int32_t*, int, int);
template double cross_entropy_forward<double>(double*, double*, const double*, const int32_t*, int, int);
template void cross_entropy_backward<float>(float*, const float*, const float*, const int32_t*, float, int, int);
template void cross_entropy_backward<double>(double*, const double*, const double*, const int32_t*, double, int, int);

}  // namespace mop::cpu
