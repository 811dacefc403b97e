#include <algorithm>

#include "cli/ops_bench/cuda/fill.h"
#include "ops/cuda/check.cuh"

namespace mop::bench {
namespace {

constexpr int kThreads = 256;
inline unsigned grid_for(size_t n) {
  return unsigned(std::min<size_t>(8192, std::max<size_t>(1, (n + kThreads - 1) / kThreads)));
}

// splitmix64: a good 64-bit mix of (seed, index); one call per element.
__device__ inline uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
__device__ inline float unit(uint64_t seed, size_t i) {  // [0, 1)
  return float(mix(seed * 0x100000001B3ull + i) >> 40) * (1.f / 16777216.f);
}

template <class T>
__global__ void uniform_kernel(T* x, size_t n, uint64_t seed, float lo, float hi) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float v = lo + (hi - lo) * unit(seed, i);
    if constexpr (sizeof(T) == 2)
      x[i] = __float2bfloat16_rn(v);
    else
      x[i] = v;
  }
}

__global__ void ids_kernel(int32_t* x, size_t n, uint64_t seed, int32_t bound) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = int32_t(mix(seed * 0x100000001B3ull + i) % uint64_t(bound));
}

__global__ void topk_kernel(int32_t* idx, int N, int K, int E, uint64_t seed) {
  const int step = E / K;  // K distinct experts: e0, e0 + step, ... (mod E), step >= 1 since K <= E
  for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x) {
    const int e0 = int(mix(seed * 0x100000001B3ull + uint64_t(n)) % uint64_t(E));
    for (int k = 0; k < K; ++k) idx[size_t(n) * K + k] = (e0 + k * step) % E;
  }
}

}  // namespace

void fill_uniform(__nv_bfloat16* x, size_t n, uint64_t seed, float lo, float hi, cudaStream_t stream) {
  if (n == 0) return;
  uniform_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n, seed, lo, hi);
  MOP_CUDA_LAUNCH_CHECK();
}
void fill_uniform(float* x, size_t n, uint64_t seed, float lo, float hi, cudaStream_t stream) {
  if (n == 0) return;
  uniform_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n, seed, lo, hi);
  MOP_CUDA_LAUNCH_CHECK();
}
void fill_ids(int32_t* x, size_t n, uint64_t seed, int32_t bound, cudaStream_t stream) {
  MOP_CHECK(bound > 0, "fill_ids: bound {} must be positive", bound);
  if (n == 0) return;
  ids_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n, seed, bound);
  MOP_CUDA_LAUNCH_CHECK();
}
void fill_topk_ids(int32_t* idx_NK, int N, int K, int E, uint64_t seed, cudaStream_t stream) {
  MOP_CHECK(K >= 1 && K <= E, "fill_topk_ids: top-k {} must lie in [1, E = {}]", K, E);
  if (N == 0) return;
  topk_kernel<<<grid_for(size_t(N)), kThreads, 0, stream>>>(idx_NK, N, K, E, seed);
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace mop::bench
