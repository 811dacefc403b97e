#include "ops/cuda/router.h"

#include <algorithm>
#include <cmath>

#include "ops/cuda/check.cuh"

namespace mop::cuda {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxWarpsPerBlock = 4;
constexpr size_t kSmemLimit = 48 * 1024;  // default dynamic shared memory limit, no opt-in needed

void check_config(const cpu::RouterConfig& c, int N) {
  MOP_CHECK(N >= 0, "router: N={} < 0", N);
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

// Per-warp scratch of the forward kernel: scores and group scores (fp64), probs, selected ids,
// eligibility flags. Rounded up to 8 bytes so every warp's doubles stay aligned.
size_t forward_warp_bytes(int E, int G) {
  const size_t b = 8 * size_t(E + G) + 4 * size_t(E) + 4 * size_t(E) + size_t(E + G);
  return (b + 7) / 8 * 8;
}

}  // namespace

// a beats b: higher score, ties to the lower index; index < 0 means "no candidate".
static __device__ __forceinline__ bool better(double sa, int ia, double sb, int ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  return sa > sb || (sa == sb && ia < ib);
}

// Butterfly reductions: every lane ends with the same bits, and the order is fixed (deterministic).
static __device__ __forceinline__ void warp_argmax(double& s, int& i) {
  for (int off = 16; off > 0; off >>= 1) {
    const double os = __shfl_xor_sync(kFull, s, off);
    const int oi = __shfl_xor_sync(kFull, i, off);
    if (better(os, oi, s, i)) s = os, i = oi;
  }
}
static __device__ __forceinline__ double warp_sum(double x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
  return x;
}
static __device__ __forceinline__ double warp_max(double x) {
  for (int off = 16; off > 0; off >>= 1) x = fmax(x, __shfl_xor_sync(kFull, x, off));
  return x;
}

// One warp per token. Lane L owns experts e = L, L+32, ... (it alone writes their per-expert
// state), so most steps need no synchronisation; __syncwarp() where a lane reads another's.
static __global__ void router_forward_kernel(float* probs_NE, int32_t* idx_NK, float* w_NK, const float* logits_NE,
                                             const float* bias_E, int N, int E, int K, int G, int topk_groups,
                                             bool softmax, bool norm_topk, double routed_scale, size_t warp_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * (blockDim.x / 32) + warp;
  if (n >= N) return;  // whole warp leaves together
  unsigned char* base = smem + size_t(warp) * warp_bytes;
  double* score = reinterpret_cast<double*>(base);
  double* gscore = score + E;
  float* prob = reinterpret_cast<float*>(gscore + G);
  int* sel = reinterpret_cast<int*>(prob + E);
  unsigned char* allowed = reinterpret_cast<unsigned char*>(sel + E);
  unsigned char* gallowed = allowed + E;

  const float* l = logits_NE + size_t(n) * E;
  float* p = probs_NE + size_t(n) * E;
  if (softmax) {
    double m = -INFINITY, sum = 0;
    for (int e = lane; e < E; e += 32) m = fmax(m, double(l[e]));
    m = warp_max(m);
    for (int e = lane; e < E; e += 32) {  // score[] (lane-owned) holds exp(l - m) until the ranking
      score[e] = exp(double(l[e]) - m);
      sum += score[e];
    }
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) prob[e] = float(score[e] / sum);
  } else {
    for (int e = lane; e < E; e += 32) prob[e] = float(1.0 / (1.0 + exp(-double(l[e]))));
  }
  // Ranking uses the stored fp32 probs, as the CPU op, so backward sees the same numbers.
  for (int e = lane; e < E; e += 32) {
    p[e] = prob[e];
    score[e] = double(prob[e]) + (bias_E ? double(bias_E[e]) : 0.0);
    allowed[e] = G == 1;
  }
  __syncwarp();

  if (G > 1) {
    const int gsize = E / G;
    for (int g = lane; g < G; g += 32) {  // sum of the group's top-2 (top-1 for groups of one), CPU order
      double a = -INFINITY, b = -INFINITY;
      for (int e = g * gsize; e < (g + 1) * gsize; ++e) {
        const double s = score[e];
        if (s > a) b = a, a = s;
        else if (s > b) b = s;
      }
      gscore[g] = gsize >= 2 ? a + b : a;
      gallowed[g] = 1;
    }
    __syncwarp();
    for (int t = 0; t < topk_groups; ++t) {
      double bs = -INFINITY;
      int bi = -1;
      for (int g = lane; g < G; g += 32)
        if (gallowed[g] && better(gscore[g], g, bs, bi)) bs = gscore[g], bi = g;
      warp_argmax(bs, bi);
      if (bi < 0) break;  // unreachable: topk_groups <= G
      if ((bi & 31) == lane) gallowed[bi] = 0;
      for (int e = bi * gsize + lane; e < (bi + 1) * gsize; e += 32) allowed[e] = 1;
    }
    __syncwarp();
  }

  double psum = 0;
  for (int k = 0; k < K; ++k) {
    double bs = -INFINITY;
    int bi = -1;
    for (int e = lane; e < E; e += 32)
      if (allowed[e] && better(score[e], e, bs, bi)) bs = score[e], bi = e;
    warp_argmax(bs, bi);
    if (bi < 0) bi = 0;  // unreachable: K <= eligible experts (checked on the host)
    if ((bi & 31) == lane) allowed[bi] = 0;
    if (lane == 0) idx_NK[size_t(n) * K + k] = bi, sel[k] = bi;
    psum += double(prob[bi]);  // same k order on every lane as the CPU's serial sum
  }
  __syncwarp();
  const double denom = norm_topk ? psum : 1.0;
  for (int k = lane; k < K; k += 32) w_NK[size_t(n) * K + k] = float(routed_scale * double(prob[sel[k]]) / denom);
}

static __global__ void router_backward_kernel(float* dlogits_NE, const float* dw_NK, const float* dprobs_NE,
                                              const float* probs_NE, const int32_t* idx_NK, int N, int E, int K,
                                              bool softmax, bool norm_topk, double routed_scale) {
  extern __shared__ double dp_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * (blockDim.x / 32) + warp;
  if (n >= N) return;
  double* dp = dp_smem + size_t(warp) * E;  // lane-owned like the forward's state: no syncs needed
  const float* p = probs_NE + size_t(n) * E;
  const float* dw = dw_NK + size_t(n) * K;
  const int32_t* idx = idx_NK + size_t(n) * K;
  for (int e = lane; e < E; e += 32) dp[e] = dprobs_NE ? double(dprobs_NE[size_t(n) * E + e]) : 0.0;
  // w_k = c p_k / S: dp_k = c (dw_k - sum_j dw_j p_j / S) / S; every lane computes S and wdot in k order.
  double S = 1.0, wdot = 0.0;
  if (norm_topk) {
    S = 0;
    for (int k = 0; k < K; ++k)
      if (idx[k] >= 0 && idx[k] < E) S += double(p[idx[k]]);
    for (int k = 0; k < K; ++k)
      if (idx[k] >= 0 && idx[k] < E) wdot += double(dw[k]) * p[idx[k]];
  }
  for (int k = 0; k < K; ++k) {
    const int e = idx[k];
    if (e >= 0 && e < E && (e & 31) == lane) dp[e] += routed_scale * (double(dw[k]) - wdot / S) / S;
  }
  float* dl = dlogits_NE + size_t(n) * E;
  if (softmax) {
    double pdp = 0;
    for (int e = lane; e < E; e += 32) pdp += double(p[e]) * dp[e];
    pdp = warp_sum(pdp);
    for (int e = lane; e < E; e += 32) dl[e] = float(double(p[e]) * (dp[e] - pdp));
  } else {
    for (int e = lane; e < E; e += 32) dl[e] = float(dp[e] * double(p[e]) * (1.0 - double(p[e])));
  }
}

// Shared-memory histogram per block, then one integer atomic per (block, expert).
static __global__ void expert_counts_kernel(int32_t* counts_E, const int32_t* idx, size_t M, int E) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (size_t a = size_t(blockIdx.x) * blockDim.x + threadIdx.x; a < M; a += size_t(gridDim.x) * blockDim.x) {
    const int e = idx[a];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e]) atomicAdd(&counts_E[e], hist[e]);
}

// Column means over N in fp64. Block (8, 128): 8 experts (a 32-byte sector of a row) by 128 row
// phases; phase y sums rows y, y+128, ... and a fixed tree adds the phases: deterministic.
constexpr int kColTile = 8, kRowPhases = 128;
static __global__ void column_mean_kernel(float* mean_E, const float* probs_NE, int N, int E) {
  __shared__ double part[kRowPhases][kColTile];
  const int e = blockIdx.x * kColTile + threadIdx.x;
  double s = 0;
  if (e < E)
    for (int n = threadIdx.y; n < N; n += kRowPhases) s += double(probs_NE[size_t(n) * E + e]);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  for (int h = kRowPhases / 2; h > 0; h /= 2) {
    if (int(threadIdx.y) < h) part[threadIdx.y][threadIdx.x] += part[threadIdx.y + h][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && e < E) mean_E[e] = float(part[0][threadIdx.x] / N);
}

constexpr int kLossThreads = 256;
static __global__ void lb_loss_kernel(float* loss_1, const float* mean_E, const int32_t* counts_E, int N, int E,
                                      int K) {
  __shared__ double part[kLossThreads];
  double s = 0;
  for (int e = threadIdx.x; e < E; e += kLossThreads)
    s += double(counts_E[e]) / (double(N) * K) * double(mean_E[e]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int h = kLossThreads / 2; h > 0; h /= 2) {
    if (int(threadIdx.x) < h) part[threadIdx.x] += part[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss_1[0] = float(E * part[0]);
}

static __global__ void lb_loss_backward_kernel(float* dprobs_NE, double dloss, const int32_t* counts_E, int N, int E,
                                               int K) {
  const size_t total = size_t(N) * E;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const int e = int(i % E);
    dprobs_NE[i] += float(dloss * E * (double(counts_E[e]) / (double(N) * K)) / N);
  }
}

void router_forward(float* probs_NE, int32_t* idx_NK, float* w_NK, const float* logits_NE, const float* bias_E,
                    const cpu::RouterConfig& cfg, int N, cudaStream_t stream) {
  check_config(cfg, N);
  if (N == 0) return;
  MOP_CHECK(probs_NE && idx_NK && w_NK && logits_NE, "router_forward: null pointer");
  const size_t warp_bytes = forward_warp_bytes(cfg.E, cfg.n_groups);
  MOP_CHECK(warp_bytes <= kSmemLimit, "router_forward: E={} too large for the per-warp scratch", cfg.E);
  const int warps = int(std::min<size_t>(kMaxWarpsPerBlock, kSmemLimit / warp_bytes));
  const int blocks = (N + warps - 1) / warps;
  router_forward_kernel<<<blocks, warps * 32, warps * warp_bytes, stream>>>(
      probs_NE, idx_NK, w_NK, logits_NE, bias_E, N, cfg.E, cfg.K, cfg.n_groups, cfg.n_groups > 1 ? cfg.topk_groups : 1,
      cfg.kind == cpu::RouterKind::softmax, cfg.norm_topk, cfg.routed_scale, warp_bytes);
  MOP_CUDA_LAUNCH_CHECK();
}

void router_backward(float* dlogits_NE, const float* dw_NK, const float* dprobs_NE, const float* probs_NE,
                     const int32_t* idx_NK, const cpu::RouterConfig& cfg, int N, cudaStream_t stream) {
  check_config(cfg, N);
  if (N == 0) return;
  MOP_CHECK(dlogits_NE && dw_NK && probs_NE && idx_NK, "router_backward: null pointer");
  const size_t warp_bytes = sizeof(double) * size_t(cfg.E);
  MOP_CHECK(warp_bytes <= kSmemLimit, "router_backward: E={} too large", cfg.E);
  const int warps = int(std::min<size_t>(kMaxWarpsPerBlock, kSmemLimit / warp_bytes));
  const int blocks = (N + warps - 1) / warps;
  router_backward_kernel<<<blocks, warps * 32, warps * warp_bytes, stream>>>(
      dlogits_NE, dw_NK, dprobs_NE, probs_NE, idx_NK, N, cfg.E, cfg.K, cfg.kind == cpu::RouterKind::softmax,
      cfg.norm_topk, cfg.routed_scale);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_expert_counts(int32_t* counts_E, const int32_t* idx_NK, int N, int E, int K, cudaStream_t stream) {
  MOP_CHECK(N >= 0 && E > 0 && K >= 0, "moe_expert_counts: bad sizes N={} E={} K={}", N, E, K);
  MOP_CHECK(size_t(E) * sizeof(int) <= kSmemLimit, "moe_expert_counts: E={} too large", E);
  MOP_CUDA_CHECK(cudaMemsetAsync(counts_E, 0, sizeof(int32_t) * size_t(E), stream));
  const size_t M = size_t(N) * K;
  if (M == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<size_t>((M + threads - 1) / threads, 1024));
  expert_counts_kernel<<<blocks, threads, sizeof(int) * size_t(E), stream>>>(counts_E, idx_NK, M, E);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_lb_loss(float* loss_1, float* probs_mean_E, const float* probs_NE, const int32_t* counts_E, int N, int E,
                 int K, cudaStream_t stream) {
  MOP_CHECK(N >= 0 && E > 0 && K >= 0, "moe_lb_loss: bad sizes N={} E={} K={}", N, E, K);
  if (N == 0 || K == 0) {  // the CPU op returns 0
    MOP_CUDA_CHECK(cudaMemsetAsync(loss_1, 0, sizeof(float), stream));
    MOP_CUDA_CHECK(cudaMemsetAsync(probs_mean_E, 0, sizeof(float) * size_t(E), stream));
    return;
  }
  const int blocks = (E + kColTile - 1) / kColTile;
  column_mean_kernel<<<blocks, dim3(kColTile, kRowPhases), 0, stream>>>(probs_mean_E, probs_NE, N, E);
  MOP_CUDA_LAUNCH_CHECK();
  lb_loss_kernel<<<1, kLossThreads, 0, stream>>>(loss_1, probs_mean_E, counts_E, N, E, K);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_lb_loss_backward(float* dprobs_NE, float dloss, const int32_t* counts_E, int N, int E, int K,
                          cudaStream_t stream) {
  MOP_CHECK(N >= 0 && E > 0 && K >= 0, "moe_lb_loss_backward: bad sizes N={} E={} K={}", N, E, K);
  if (N == 0 || K == 0) return;
  const size_t total = size_t(N) * E;
  const int threads = 256;
  const int blocks = int(std::min<size_t>((total + threads - 1) / threads, 4096));
  lb_loss_backward_kernel<<<blocks, threads, 0, stream>>>(dprobs_NE, double(dloss), counts_E, N, E, K);
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace mop::cuda
