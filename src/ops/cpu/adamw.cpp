#include "ops/cpu/adamw.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace mop::cpu {

void adamw_step(float* p, const float* g, float* m, float* v, size_t n, const AdamWStep& s) {
  // Scalars in double, rounded once, as PyTorch computes them in Python floats.
  const float decay = float(1.0 - double(s.lr) * s.weight_decay);
  const float bc1 = float(1.0 - std::pow(double(s.beta1), s.step));
  const float bc2 = float(1.0 - std::pow(double(s.beta2), s.step));
  const float b1 = s.beta1, b2 = s.beta2, lr = s.lr, eps = s.eps, gs = s.grad_scale;
  const long nn = long(n);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < nn; ++i) {
    const float gi = g[i] * gs;
    p[i] *= decay;
    m[i] = b1 * m[i] + (1.0f - b1) * gi;
    v[i] = b2 * v[i] + (1.0f - b2) * (gi * gi);
    p[i] -= lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
  }
}

double sum_squares(const float* g, size_t n) {
  // Fixed-size chunks summed in chunk order: the result depends on n only, not on the thread count.
  constexpr size_t kChunk = 4096;
  const long n_chunks = long((n + kChunk - 1) / kChunk);
  std::vector<double> part(n_chunks, 0.0);
#pragma omp parallel for schedule(static)
  for (long c = 0; c < n_chunks; ++c) {
    const size_t i0 = size_t(c) * kChunk, i1 = std::min(n, i0 + kChunk);
    double s = 0;
    for (size_t i = i0; i < i1; ++i) s += double(g[i]) * g[i];
    part[c] = s;
  }
  double total = 0;
  for (double x : part) total += x;
  return total;
}

}  // namespace mop::cpu
