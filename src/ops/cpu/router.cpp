#include "ops/cpu/router.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "core/error.h"

namespace mop::cpu {

namespace {
void check_config(const RouterConfig& c) {
  MOP_CHECK(c.E > 0 && c.K > 0 && c.K <= c.E, "router: need 0 < K <= E, got K={} E={}", c.K, c.E);
  MOP_CHECK(c.n_groups > 0 && c.E % c.n_groups == 0, "router: E={} is not divisible into n_groups={}", c.E,
            c.n_groups);
  if (c.n_groups > 1) {
    MOP_CHECK(c.topk_groups > 0 && c.topk_groups <= c.n_groups, "router: topk_groups={} not in [1, n_groups={}]",
              c.topk_groups, c.n_groups);
    MOP_CHECK(c.K <= c.topk_groups * (c.E / c.n_groups),
              "router: K={} exceeds the {} experts of the topk_groups={} eligible groups", c.K,
              c.topk_groups * (c.E / c.n_groups), c.topk_groups);
  }
}

// Index of the highest score among allowed entries; strict '>' keeps the lower index on ties.
int argmax_allowed(const std::vector<double>& score, const std::vector<char>& allowed) {
  int best = -1;
  for (int e = 0; e < int(score.size()); ++e)
    if (allowed[e] && (best < 0 || score[e] > score[best])) best = e;
  return best;
}
}  // namespace

template <class T>
void router_forward(T* probs_NE, int32_t* idx_NK, T* w_NK, const T* logits_NE, const T* bias_E, const RouterConfig& cfg,
                    int N) {
  check_config(cfg);
  const int E = cfg.E, K = cfg.K, G = cfg.n_groups, gsize = E / G;
#pragma omp parallel
  {
    std::vector<double> score(E), gscore(G);
    std::vector<char> allowed(E), gallowed(G);
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const T* l = logits_NE + size_t(n) * E;
      T* p = probs_NE + size_t(n) * E;
      if (cfg.kind == RouterKind::softmax) {
        double m = -INFINITY, sum = 0;
        for (int e = 0; e < E; ++e) m = std::max(m, double(l[e]));
        for (int e = 0; e < E; ++e) sum += std::exp(double(l[e]) - m);
        for (int e = 0; e < E; ++e) p[e] = T(std::exp(double(l[e]) - m) / sum);
      } else {
        for (int e = 0; e < E; ++e) p[e] = T(1.0 / (1.0 + std::exp(-double(l[e]))));
      }
      // Ranking uses the stored (rounded) probs so it agrees with what backward sees.
      for (int e = 0; e < E; ++e) score[e] = double(p[e]) + (bias_E ? double(bias_E[e]) : 0.0);
      if (G > 1) {
        for (int g = 0; g < G; ++g) {  // sum of the group's top-2 (top-1 for groups of one)
          double a = -INFINITY, b = -INFINITY;
          for (int e = g * gsize; e < (g + 1) * gsize; ++e) {
            if (score[e] > a) b = a, a = score[e];
            else if (score[e] > b) b = score[e];
          }
          gscore[g] = gsize >= 2 ? a + b : a;
        }
        std::fill(gallowed.begin(), gallowed.end(), 1);
        std::fill(allowed.begin(), allowed.end(), 0);
        for (int t = 0; t < cfg.topk_groups; ++t) {
          int best = -1;
          for (int g = 0; g < G; ++g)
            if (gallowed[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
          gallowed[best] = 0;
          std::fill(allowed.begin() + best * gsize, allowed.begin() + (best + 1) * gsize, 1);
        }
      } else {
        std::fill(allowed.begin(), allowed.end(), 1);
      }
      int32_t* idx = idx_NK + size_t(n) * K;
      double psum = 0;
      for (int k = 0; k < K; ++k) {
        const int e = argmax_allowed(score, allowed);
        allowed[e] = 0;
        idx[k] = e;
        psum += double(p[e]);
      }
      const double denom = cfg.norm_topk ? psum : 1.0;
      T* w = w_NK + size_t(n) * K;
      for (int k = 0; k < K; ++k) w[k] = T(cfg.routed_scale * double(p[idx[k]]) / denom);
    }
  }
}

// w_k = c p_k / S (S = sum_k p_k with norm_topk, else 1): dp_k = c (dw_k - sum_j dw_j p_j / S) / S.
// Softmax: dl = p (dp - sum_e p dp); sigmoid: dl = dp p (1 - p).
template <class T>
void router_backward(T* dlogits_NE, const T* dw_NK, const T* dprobs_NE, const T* probs_NE, const int32_t* idx_NK,
                     const RouterConfig& cfg, int N) {
  check_config(cfg);
  const int E = cfg.E, K = cfg.K;
  for (size_t i = 0; i < size_t(N) * K; ++i)
    MOP_CHECK(idx_NK[i] >= 0 && idx_NK[i] < E, "router_backward: expert id {} of token {} not in [0, {})", idx_NK[i],
              i / K, E);
#pragma omp parallel
  {
    std::vector<double> dp(E);
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const T* p = probs_NE + size_t(n) * E;
      const T* dw = dw_NK + size_t(n) * K;
      const int32_t* idx = idx_NK + size_t(n) * K;
      for (int e = 0; e < E; ++e) dp[e] = dprobs_NE ? double(dprobs_NE[size_t(n) * E + e]) : 0.0;
      double S = 1.0, wdot = 0.0;
      if (cfg.norm_topk) {
        S = 0;
        for (int k = 0; k < K; ++k) S += double(p[idx[k]]);
        for (int k = 0; k < K; ++k) wdot += double(dw[k]) * p[idx[k]];
      }
      for (int k = 0; k < K; ++k) dp[idx[k]] += cfg.routed_scale * (double(dw[k]) - wdot / S) / S;
      T* dl = dlogits_NE + size_t(n) * E;
      if (cfg.kind == RouterKind::softmax) {
        double pdp = 0;
        for (int e = 0; e < E; ++e) pdp += double(p[e]) * dp[e];
        for (int e = 0; e < E; ++e) dl[e] = T(double(p[e]) * (dp[e] - pdp));
      } else {
        for (int e = 0; e < E; ++e) dl[e] = T(dp[e] * double(p[e]) * (1.0 - double(p[e])));
      }
    }
  }
}

template <class T> T moe_lb_loss_forward(int32_t* counts_E, const T* probs_NE, const int32_t* idx_NK, int N, int E, int K) {
  std::fill_n(counts_E, E, 0);
  for (size_t i = 0; i < size_t(N) * K; ++i) {
    MOP_CHECK(idx_NK[i] >= 0 && idx_NK[i] < E, "moe_lb_loss: expert id {} of token {} not in [0, {})", idx_NK[i],
              i / K, E);
    ++counts_E[idx_NK[i]];
  }
  if (N == 0 || K == 0) return T(0);
  double loss = 0;
  for (int e = 0; e < E; ++e) {
    double P = 0;
    for (int n = 0; n < N; ++n) P += double(probs_NE[size_t(n) * E + e]);
    loss += double(counts_E[e]) / (double(N) * K) * (P / N);
  }
  return T(E * loss);
}

template <class T> void moe_lb_loss_backward(T* dprobs_NE, T dloss, const int32_t* counts_E, int N, int E, int K) {
  if (N == 0 || K == 0) return;
  std::vector<T> g(E);
  for (int e = 0; e < E; ++e) g[e] = T(double(dloss) * E * (double(counts_E[e]) / (double(N) * K)) / N);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n)
    for (int e = 0; e < E; ++e) dprobs_NE[size_t(n) * E + e] += g[e];
}

template void router_forward<float>(float*, int32_t*, float*, const float*, const float*, const RouterConfig&, int);
template void router_forward<double>(double*, int32_t*, double*, const double*, const double*, const RouterConfig&,
                                     int);
template void router_backward<float>(float*, const float*, const float*, const float*, const int32_t*,
                                     const RouterConfig&, int);
template void router_backward<double>(double*, const double*, const double*, const double*, const int32_t*,
                                      const RouterConfig&, int);
template float moe_lb_loss_forward<float>(int32_t*, const float*, const int32_t*, int, int, int);
template double moe_lb_loss_forward<double>(int32_t*, const double*, const int32_t*, int, int, int);
template void moe_lb_loss_backward<float>(float*, float, const int32_t*, int, int, int);
template void moe_lb_loss_backward<double>(double*, double, const int32_t*, int, int, int);

}  // namespace mop::cpu
