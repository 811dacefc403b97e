#include "ops/cuda/cross_entropy.h"

#include <cmath>

#include "ops/cuda/bf16_vec.cuh"
#include "ops/cuda/check.cuh"

namespace mop::cuda {

using bf16 = __nv_bfloat16;

namespace {
constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kSumThreads = 1024;
// Running (max, sum of exp(x - max)); m == -inf means "nothing seen yet".
struct MaxSum {
  float m, s;
};
}  // namespace

static __device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {-INFINITY, 0.f};
  // Symmetric in a and b, so the butterfly leaves the same bits on every lane.
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// One block per row; thread t handles elements [c, c + W) for c = t*W, t*W + kThreads*W, ...
// logits and dlogits may alias: no __restrict__ on them.
template <int W>
static __global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(float* loss_N, float* lse_N, bf16* dlogits_NV, const bf16* logits_NV,
                         const int32_t* targets_N, int V, float dscale) {
  __shared__ MaxSum warp_part[kWarps];
  __shared__ float row_lse;
  const int n = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int t = targets_N[n];
  const bf16* x = logits_NV + size_t(n) * V;
  bf16* dx = dlogits_NV ? dlogits_NV + size_t(n) * V : nullptr;
  if (t < 0 || t >= V) {  // ignored (or invalid) row: uniform across the block
    if (tid == 0) loss_N[n] = lse_N[n] = t < 0 ? 0.f : NAN;
    if (dx) {
      const float zero[W] = {};
      for (int c = tid * W; c < V; c += kThreads * W) store_bf16<W>(dx + c, zero);
    }
    return;
  }
  // The target logit is read before the barrier below, hence before any thread writes the row.
  const float x_target = tid == 0 ? __bfloat162float(x[t]) : 0.f;

  MaxSum acc{-INFINITY, 0.f};
  for (int c = tid * W; c < V; c += kThreads * W) {
    float v[W];
    load_f32<W>(x + c, v);
    float vm = v[0];
#pragma unroll
    for (int j = 1; j < W; ++j) vm = fmaxf(vm, v[j]);
    const float m = fmaxf(acc.m, vm);
    if (m == -INFINITY) continue;
    float s = acc.s * expf(acc.m - m);  // 0 when acc.m is -inf
#pragma unroll
    for (int j = 0; j < W; ++j) s += expf(v[j] - m);
    acc = {m, s};
  }
  for (int off = 16; off > 0; off >>= 1)
    acc = merge(acc, {__shfl_xor_sync(kFull, acc.m, off), __shfl_xor_sync(kFull, acc.s, off)});
  if (lane == 0) warp_part[warp] = acc;
  __syncthreads();  // every read of the row's statistics is done before this point
  if (warp == 0) {
    acc = lane < kWarps ? warp_part[lane] : MaxSum{-INFINITY, 0.f};
    for (int off = 16; off > 0; off >>= 1)
      acc = merge(acc, {__shfl_xor_sync(kFull, acc.m, off), __shfl_xor_sync(kFull, acc.s, off)});
    if (lane == 0) row_lse = acc.m + logf(acc.s);
  }
  __syncthreads();
  const float lse = row_lse;
  if (tid == 0) loss_N[n] = lse - x_target, lse_N[n] = lse;
  if (!dx) return;
  for (int c = tid * W; c < V; c += kThreads * W) {
    float v[W];
    load_f32<W>(x + c, v);  // read before the write of the same element (aliasing)
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float p = expf(v[j] - lse);
      v[j] = dscale * (c + j == t ? p - 1.f : p);
    }
    store_bf16<W>(dx + c, v);
  }
}

static __global__ void __launch_bounds__(kSumThreads) sum_losses_kernel(double* out_1, const float* loss_N, int N) {
  __shared__ double part[kSumThreads];
  double s = 0;
  for (int i = threadIdx.x; i < N; i += kSumThreads) s += double(loss_N[i]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int h = kSumThreads / 2; h > 0; h /= 2) {
    if (int(threadIdx.x) < h) part[threadIdx.x] += part[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) out_1[0] = part[0];
}

void cross_entropy_forward_backward(float* loss_N, float* lse_N, bf16* dlogits_NV, const bf16* logits_NV,
                                    const int32_t* targets_N, int N, int V, float dscale, cudaStream_t stream) {
  MOP_CHECK(N >= 0 && V > 0, "cross_entropy: bad sizes N={} V={}", N, V);
  if (N == 0) return;
  MOP_CHECK(loss_N && lse_N && logits_NV && targets_N, "cross_entropy: null pointer");
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (V % 8 == 0 && aligned(logits_NV) && aligned(dlogits_NV))
    cross_entropy_kernel<8><<<N, kThreads, 0, stream>>>(loss_N, lse_N, dlogits_NV, logits_NV, targets_N, V, dscale);
  else
    cross_entropy_kernel<1><<<N, kThreads, 0, stream>>>(loss_N, lse_N, dlogits_NV, logits_NV, targets_N, V, dscale);
  MOP_CUDA_LAUNCH_CHECK();
}

void sum_losses(double* out_1, const float* loss_N, int N, cudaStream_t stream) {
  MOP_CHECK(N >= 0, "sum_losses: N={} < 0", N);
  if (N == 0) {
    MOP_CUDA_CHECK(cudaMemsetAsync(out_1, 0, sizeof(double), stream));  // all-zero bits are 0.0
    return;
  }
  sum_losses_kernel<<<1, kSumThreads, 0, stream>>>(out_1, loss_N, N);
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace mop::cuda
