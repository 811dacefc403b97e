#include "ops/cuda/rmsnorm.h"

#include <algorithm>
#include <cstdint>

#include "ops/cuda/bf16_vec.cuh"
#include "ops/cuda/check.cuh"

namespace mop::cuda {

namespace {

constexpr int kWarpsFwd = 8;          // forward: one warp per row, 8 rows per block
constexpr int kMaxBwdThreads = 256;   // backward: one block per range of rows
constexpr int kMaxBwdBlocks = 1024;   // about 8 resident blocks on each of 132 SMs
constexpr int kSumCols = 32, kSumGroups = 32;  // partial-sum kernel tile

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Butterfly: every lane ends with the same sum, in the same order on every run.
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---- forward: one warp per row; x is read twice, the second time from L1/L2 -------------------
template <int kVec, bool kResid>
__global__ void rmsnorm_forward_kernel(__nv_bfloat16* resid_out_ND, __nv_bfloat16* y_ND, float* rstd_N,
                                       const __nv_bfloat16* resid_ND, const __nv_bfloat16* x_ND,
                                       const __nv_bfloat16* w_D, int N, int D, float eps) {
  const int lane = threadIdx.x % 32, n = blockIdx.x * kWarpsFwd + threadIdx.x / 32;
  if (n >= N) return;  // whole warps only: the shuffles below stay full-warp
  const size_t row = size_t(n) * D;
  const int n_vec = D / kVec;
  float ss = 0.f;
  for (int v = lane; v < n_vec; v += 32) {
    const size_t off = row + size_t(v) * kVec;
    F32Vec<kVec> x = load_vec<kVec>(x_ND + off);
    if constexpr (kResid) {
      const F32Vec<kVec> r = load_vec<kVec>(resid_ND + off);
#pragma unroll
      for (int k = 0; k < kVec; ++k) x.v[k] = __bfloat162float(__float2bfloat16_rn(x.v[k] + r.v[k]));
      store_vec<kVec>(resid_out_ND + off, x);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) ss += x.v[k] * x.v[k];
  }
  const float rstd = 1.f / sqrtf(warp_sum(ss) / float(D) + eps);
  if (rstd_N && lane == 0) rstd_N[n] = rstd;
  // With kResid this re-reads this thread's own resid_out writes, so aliasing resid_out with
  // resid or x is safe.
  const __nv_bfloat16* src = kResid ? resid_out_ND : x_ND;
  for (int v = lane; v < n_vec; v += 32) {
    const size_t off = row + size_t(v) * kVec;
    F32Vec<kVec> x = load_vec<kVec>(src + off);
    const F32Vec<kVec> w = load_vec<kVec>(w_D + size_t(v) * kVec);
#pragma unroll
    for (int k = 0; k < kVec; ++k) x.v[k] = x.v[k] * rstd * w.v[k];
    store_vec<kVec>(y_ND + off, x);
  }
}

// ---- backward -------------------------------------------------------------------------------
// Block b owns rows [b R, (b + 1) R); R and the block count depend only on N, so the scratch
// size and the summation order are fixed.
inline int bwd_rows_per_block(int N) { return std::max(1, (N + kMaxBwdBlocks - 1) / kMaxBwdBlocks); }
inline int bwd_blocks(int N) { return (N + bwd_rows_per_block(N) - 1) / bwd_rows_per_block(N); }

// Block-wide sum; red is a 32-float shared buffer that alternates between calls (by row parity)
// so one barrier per call suffices. Warp sums are added in warp order: deterministic.
__device__ inline float block_sum(float x, float* red) {
  x = warp_sum(x);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) s += red[w];
  return s;
}

// dx_j = r (w_j dy_j - x_j c) with c = r^2 (sum_i dy_i w_i x_i) / D; dw_j += dy_j x_j r.
// Each thread keeps dw for its own columns in shared memory, laid out [kVec][n_vec] so that a
// warp's accesses hit consecutive banks.
template <int kVec>
__global__ void rmsnorm_backward_kernel(__nv_bfloat16* dx_ND, float* partial_GD, const __nv_bfloat16* dy_ND,
                                        const __nv_bfloat16* x_ND, const __nv_bfloat16* w_D, const float* rstd_N,
                                        int N, int D, int rows_per_block) {
  extern __shared__ float dw_acc[];  // D floats
  __shared__ float red[2][32];
  const int n_vec = D / kVec;
  for (int v = threadIdx.x; v < n_vec; v += blockDim.x)
#pragma unroll
    for (int k = 0; k < kVec; ++k) dw_acc[k * n_vec + v] = 0.f;

  const int n0 = blockIdx.x * rows_per_block, n1 = min(N, n0 + rows_per_block);
  for (int n = n0; n < n1; ++n) {
    const size_t row = size_t(n) * D;
    const float r = rstd_N[n];
    float dot = 0.f;
    for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
      const size_t off = row + size_t(v) * kVec;
      const F32Vec<kVec> dy = load_vec<kVec>(dy_ND + off), x = load_vec<kVec>(x_ND + off),
                         w = load_vec<kVec>(w_D + size_t(v) * kVec);
#pragma unroll
      for (int k = 0; k < kVec; ++k) dot += dy.v[k] * w.v[k] * x.v[k];
    }
    const float c = r * r * block_sum(dot, red[n & 1]) / float(D);
    for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
      const size_t off = row + size_t(v) * kVec;
      const F32Vec<kVec> dy = load_vec<kVec>(dy_ND + off), x = load_vec<kVec>(x_ND + off),
                         w = load_vec<kVec>(w_D + size_t(v) * kVec);
      F32Vec<kVec> dx;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        dx.v[k] = r * (w.v[k] * dy.v[k] - x.v[k] * c);
        dw_acc[k * n_vec + v] += dy.v[k] * x.v[k] * r;
      }
      store_vec<kVec>(dx_ND + off, dx);
    }
  }
  float* partial = partial_GD + size_t(blockIdx.x) * D;
  for (int v = threadIdx.x; v < n_vec; v += blockDim.x)
#pragma unroll
    for (int k = 0; k < kVec; ++k) partial[size_t(v) * kVec + k] = dw_acc[k * n_vec + v];
}

// dw[d] += sum_g partial[g, d]: thread (x, y) sums rows g = y, y + kSumGroups, ... of column d,
// then the kSumGroups sums are added in order of y. Fixed order: deterministic.
template <class T> __global__ void add_partials_kernel(T* dw_D, const float* partial_GD, int G, int D) {
  __shared__ float sums[kSumGroups][kSumCols];
  const int d = blockIdx.x * kSumCols + threadIdx.x;
  float s = 0.f;
  if (d < D) {
    // Eight loads in flight before their (still sequential) additions: latency, not bandwidth,
    // bounds this kernel.
    const float* p = partial_GD + d;
    int g = threadIdx.y;
    for (; g + 7 * kSumGroups < G; g += 8 * kSumGroups) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = p[size_t(g + u * kSumGroups) * D];
#pragma unroll
      for (int u = 0; u < 8; ++u) s += v[u];
    }
    for (; g < G; g += kSumGroups) s += p[size_t(g) * D];
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float total = 0.f;
    for (int y = 0; y < kSumGroups; ++y) total += sums[y][threadIdx.x];
    if constexpr (sizeof(T) == 4) dw_D[d] += total;
    else dw_D[d] = __float2bfloat16_rn(__bfloat162float(dw_D[d]) + total);
  }
}

template <bool kResid>
void launch_forward(__nv_bfloat16* resid_out_ND, __nv_bfloat16* y_ND, float* rstd_N, const __nv_bfloat16* resid_ND,
                    const __nv_bfloat16* x_ND, const __nv_bfloat16* w_D, int N, int D, float eps, cudaStream_t stream,
                    const char* op) {
  MOP_CHECK(N >= 0 && D > 0, "{}: bad shape N={} D={}", op, N, D);
  if (N == 0) return;
  MOP_CHECK(y_ND && x_ND && w_D && (!kResid || (resid_out_ND && resid_ND)), "{}: null pointer", op);
  const bool vec = D % 8 == 0 && aligned16(y_ND) && aligned16(x_ND) && aligned16(w_D) &&
                   (!kResid || (aligned16(resid_out_ND) && aligned16(resid_ND)));
  const unsigned blocks = unsigned((N + kWarpsFwd - 1) / kWarpsFwd);
  if (vec) {
    rmsnorm_forward_kernel<8, kResid><<<blocks, kWarpsFwd * 32, 0, stream>>>(resid_out_ND, y_ND, rstd_N, resid_ND,
                                                                             x_ND, w_D, N, D, eps);
  } else {
    rmsnorm_forward_kernel<1, kResid><<<blocks, kWarpsFwd * 32, 0, stream>>>(resid_out_ND, y_ND, rstd_N, resid_ND,
                                                                             x_ND, w_D, N, D, eps);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

template <int kVec>
void launch_backward(__nv_bfloat16* dx_ND, float* scratch, const __nv_bfloat16* dy_ND, const __nv_bfloat16* x_ND,
                     const __nv_bfloat16* w_D, const float* rstd_N, int N, int D, cudaStream_t stream) {
  const int n_vec = D / kVec;
  const int threads = std::min(kMaxBwdThreads, (n_vec + 31) / 32 * 32);
  const size_t smem = size_t(D) * sizeof(float);
  if (smem > 48 * 1024) {  // beyond the default dynamic shared-memory limit: opt in
    int dev = 0, max_smem = 0;
    MOP_CUDA_CHECK(cudaGetDevice(&dev));
    MOP_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    MOP_CHECK(smem + 2 * 32 * sizeof(float) <= size_t(max_smem), "rmsnorm_backward: D={} too large", D);
    MOP_CUDA_CHECK(cudaFuncSetAttribute(rmsnorm_backward_kernel<kVec>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)));
  }
  rmsnorm_backward_kernel<kVec><<<bwd_blocks(N), threads, smem, stream>>>(dx_ND, scratch, dy_ND, x_ND, w_D, rstd_N,
                                                                          N, D, bwd_rows_per_block(N));
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace

void rmsnorm_forward(__nv_bfloat16* y_ND, float* rstd_N, const __nv_bfloat16* x_ND, const __nv_bfloat16* w_D, int N,
                     int D, float eps, cudaStream_t stream) {
  launch_forward<false>(nullptr, y_ND, rstd_N, nullptr, x_ND, w_D, N, D, eps, stream, "rmsnorm_forward");
}

void rmsnorm_residual_forward(__nv_bfloat16* resid_out_ND, __nv_bfloat16* y_ND, float* rstd_N,
                              const __nv_bfloat16* resid_ND, const __nv_bfloat16* x_ND, const __nv_bfloat16* w_D,
                              int N, int D, float eps, cudaStream_t stream) {
  launch_forward<true>(resid_out_ND, y_ND, rstd_N, resid_ND, x_ND, w_D, N, D, eps, stream,
                       "rmsnorm_residual_forward");
}

size_t rmsnorm_backward_scratch_floats(int N, int D) {
  MOP_CHECK(N >= 0 && D > 0, "rmsnorm_backward_scratch_floats: bad shape N={} D={}", N, D);
  return N == 0 ? 0 : size_t(bwd_blocks(N)) * D;
}

namespace {

template <class T>
void backward_impl(__nv_bfloat16* dx_ND, T* dw_D, const __nv_bfloat16* dy_ND, const __nv_bfloat16* x_ND,
                   const __nv_bfloat16* w_D, const float* rstd_N, int N, int D, float* scratch, cudaStream_t stream) {
  MOP_CHECK(N >= 0 && D > 0, "rmsnorm_backward: bad shape N={} D={}", N, D);
  if (N == 0) return;
  MOP_CHECK(dx_ND && dw_D && dy_ND && x_ND && w_D && rstd_N && scratch, "rmsnorm_backward: null pointer");
  if (D % 8 == 0 && aligned16(dx_ND) && aligned16(dy_ND) && aligned16(x_ND) && aligned16(w_D)) {
    launch_backward<8>(dx_ND, scratch, dy_ND, x_ND, w_D, rstd_N, N, D, stream);
  } else {
    launch_backward<1>(dx_ND, scratch, dy_ND, x_ND, w_D, rstd_N, N, D, stream);
  }
  add_partial_rows(dw_D, scratch, bwd_blocks(N), D, stream);
}

template <class T> void add_partial_rows_impl(T* dw_D, const float* partial_GD, int G, int D, cudaStream_t stream) {
  MOP_CHECK(G >= 0 && D >= 0, "add_partial_rows: bad shape G={} D={}", G, D);
  if (G == 0 || D == 0) return;
  const dim3 grid(unsigned((D + kSumCols - 1) / kSumCols)), block(kSumCols, kSumGroups);
  add_partials_kernel<<<grid, block, 0, stream>>>(dw_D, partial_GD, G, D);
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace

void rmsnorm_backward(__nv_bfloat16* dx_ND, float* dw_D, const __nv_bfloat16* dy_ND, const __nv_bfloat16* x_ND,
                      const __nv_bfloat16* w_D, const float* rstd_N, int N, int D, float* scratch,
                      cudaStream_t stream) {
  backward_impl(dx_ND, dw_D, dy_ND, x_ND, w_D, rstd_N, N, D, scratch, stream);
}

void rmsnorm_backward(__nv_bfloat16* dx_ND, __nv_bfloat16* dw_D, const __nv_bfloat16* dy_ND,
                      const __nv_bfloat16* x_ND, const __nv_bfloat16* w_D, const float* rstd_N, int N, int D,
                      float* scratch, cudaStream_t stream) {
  backward_impl(dx_ND, dw_D, dy_ND, x_ND, w_D, rstd_N, N, D, scratch, stream);
}

void add_partial_rows(float* dw_D, const float* partial_GD, int G, int D, cudaStream_t stream) {
  add_partial_rows_impl(dw_D, partial_GD, G, D, stream);
}

void add_partial_rows(__nv_bfloat16* dw_D, const float* partial_GD, int G, int D, cudaStream_t stream) {
  add_partial_rows_impl(dw_D, partial_GD, G, D, stream);
}

}  // namespace mop::cuda
