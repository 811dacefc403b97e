#include "ops/cpu/swiglu.h"

#include <cmath>
#include <cstddef>

namespace mop::cpu {

namespace {
// Never overflows to NaN: for very negative g, exp(-g) = inf gives 0.
inline double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }
}  // namespace

template <class T> void swiglu_forward(T* h_NF, const T* gu_N2F, int N, int F) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* g = gu_N2F + size_t(n) * 2 * F;
    const T* u = g + F;
    T* h = h_NF + size_t(n) * F;
    for (int f = 0; f < F; ++f) h[f] = T(double(g[f]) * sigmoid(g[f]) * u[f]);
  }
}

// silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
template <class T> void swiglu_backward(T* dgu_N2F, const T* dh_NF, const T* gu_N2F, int N, int F) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* g = gu_N2F + size_t(n) * 2 * F;
    const T* u = g + F;
    const T* dh = dh_NF + size_t(n) * F;
    T* dg = dgu_N2F + size_t(n) * 2 * F;
    T* du = dg + F;
    for (int f = 0; f < F; ++f) {
      const double gf = g[f], uf = u[f], s = sigmoid(gf);
      const double dhf = dh[f];
      dg[f] = T(dhf * uf * s * (1.0 + gf * (1.0 - s)));
      du[f] = T(dhf * gf * s);
    }
  }
}

template void swiglu_forward<float>(float*, const float*, int, int);
template void swiglu_forward<double>(double*, const double*, int, int);
template void swiglu_backward<float>(float*, const float*, const float*, int, int);
template void swiglu_backward<double>(double*, const double*, const double*, int, int);

}  // namespace mop::cpu
