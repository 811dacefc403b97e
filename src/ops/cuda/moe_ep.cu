#include "ops/cuda/moe_ep.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "ops/cuda/check.cuh"
#include "ops/cuda/moe_permute.h"

namespace mop::cuda {

namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ bool has_rank(const int32_t* idx_K, int K, int E, int El, int r) {
  for (int k = 0; k < K; ++k) {
    const int e = idx_K[k];
    if (e >= 0 && e < E && e / El == r) return true;
  }
  return false;
}

void check_sizes(const char* op, int N, int K, int E, int ep) {
  MOP_CHECK(N >= 0 && K >= 0 && E > 0 && ep >= 1 && E % ep == 0, "{}: bad sizes N={} K={} E={} ep={}", op, N, K, E,
            ep);
  MOP_CHECK(int64_t(N) * std::max(K, ep) < (int64_t(1) << 31), "{}: N={} too large for int32 rows", op, N);
}

}  // namespace

// One block per rank: a block-wide count of the tokens with an expert there.
static __global__ void token_counts_kernel(int32_t* tokens_ep, const int32_t* idx_NK, int N, int K, int E, int El) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int r = blockIdx.x;
  int mine = 0;
  for (int n = threadIdx.x; n < N; n += kThreads) mine += has_rank(idx_NK + size_t(n) * K, K, E, El, r);
  const int total = Reduce(tmp).Sum(mine);
  if (threadIdx.x == 0) tokens_ep[r] = total;
}

// One block per rank r: tiles of tokens, a block-wide exclusive scan of "has an expert on r" gives
// each token its row; the running total carries over the tiles.
static __global__ void send_layout_kernel(int32_t* slot_Nep, int32_t* pos_SK, float* gate_SK, const int32_t* idx_NK,
                                          const float* w_NK, const int32_t* row_NK, const int32_t* offsets_E1,
                                          const int32_t* dest_base_E, const int32_t* tokens_ep, int N, int K, int E,
                                          int ep) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int base;
  const int r = blockIdx.x, El = E / ep;
  if (threadIdx.x == 0) {
    int b = 0;
    for (int q = 0; q < r; ++q) b += tokens_ep[q];
    base = b;
  }
  __syncthreads();
  for (int n0 = 0; n0 < N; n0 += kThreads) {
    const int n = n0 + threadIdx.x;
    const int has = n < N && has_rank(idx_NK + size_t(n) * K, K, E, El, r);
    int before = 0, tile = 0;
    Scan(tmp).ExclusiveSum(has, before, tile);
    if (n < N) {
      const int s = base + before;
      slot_Nep[size_t(n) * ep + r] = has ? s : -1;
      if (has)
        for (int k = 0; k < K; ++k) {
          const size_t a = size_t(n) * K + k;
          const int e = idx_NK[a];
          const bool here = e >= 0 && e < E && e / El == r && dest_base_E[e] >= 0;
          pos_SK[size_t(s) * K + k] = here ? dest_base_E[e] + row_NK[a] - offsets_E1[e] : -1;
          gate_SK[size_t(s) * K + k] = here ? w_NK[a] : 0.f;
        }
    }
    __syncthreads();  // tmp and base are reused by the next tile
    if (threadIdx.x == 0) base += tile;
    __syncthreads();
  }
}

static __global__ void plan_row_kernel(int64_t* row_W, const int32_t* offsets_E1, const int32_t* tokens_ep, int E,
                                       int ep) {
  for (int i = threadIdx.x; i < E + ep; i += blockDim.x)
    row_W[i] = i < E ? int64_t(offsets_E1[i + 1] - offsets_E1[i]) : int64_t(tokens_ep[i - E]);
}

static __global__ void gate_grads_kernel(float* dw_NK, const float* dgate_SK, const int32_t* slot_Nep,
                                         const int32_t* idx_NK, const float* guest_NK, int N, int K, int E, int ep) {
  const int El = E / ep;
  const size_t M = size_t(N) * K;
  for (size_t a = size_t(blockIdx.x) * blockDim.x + threadIdx.x; a < M; a += size_t(gridDim.x) * blockDim.x) {
    const int e = idx_NK[a];
    float g = 0.f;
    if (e >= 0 && e < E) {
      const int s = slot_Nep[(a / K) * ep + e / El];
      if (s >= 0) g = dgate_SK[size_t(s) * K + a % K];
    }
    dw_NK[a] = guest_NK ? g + guest_NK[a] : g;
  }
}

static __global__ void guest_rows_kernel(int32_t* gslot_NK, const int32_t* idx_NK, const int32_t* row_NK,
                                         const int32_t* offsets_E1, const int32_t* guest_base_E, int M, int E) {
  for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < M; a += gridDim.x * blockDim.x) {
    const int e = idx_NK[a];
    const int base = e >= 0 && e < E ? guest_base_E[e] : -1;
    gslot_NK[a] = base >= 0 ? base + row_NK[a] - offsets_E1[e] : -1;
  }
}

void moe_ep_token_counts(int32_t* tokens_ep, const int32_t* idx_NK, int N, int K, int E, int ep, cudaStream_t stream) {
  check_sizes("moe_ep_token_counts", N, K, E, ep);
  token_counts_kernel<<<ep, kThreads, 0, stream>>>(tokens_ep, idx_NK, N, K, E, E / ep);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_ep_plan_row(int64_t* row_W, const int32_t* offsets_E1, const int32_t* tokens_ep, int E, int ep,
                     cudaStream_t stream) {
  check_sizes("moe_ep_plan_row", 0, 0, E, ep);
  plan_row_kernel<<<1, 256, 0, stream>>>(row_W, offsets_E1, tokens_ep, E, ep);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_ep_send_layout(int32_t* slot_Nep, int32_t* pos_SK, float* gate_SK, const int32_t* idx_NK, const float* w_NK,
                        const int32_t* row_NK, const int32_t* offsets_E1, const int32_t* dest_base_E,
                        const int32_t* tokens_ep, int N, int K, int E, int ep, cudaStream_t stream) {
  check_sizes("moe_ep_send_layout", N, K, E, ep);
  if (N == 0) return;
  send_layout_kernel<<<ep, kThreads, 0, stream>>>(slot_Nep, pos_SK, gate_SK, idx_NK, w_NK, row_NK, offsets_E1,
                                                  dest_base_E, tokens_ep, N, K, E, ep);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_ep_gate_grads(float* dw_NK, const float* dgate_SK, const int32_t* slot_Nep, const int32_t* idx_NK, int N,
                       int K, int E, int ep, cudaStream_t stream, const float* guest_NK) {
  check_sizes("moe_ep_gate_grads", N, K, E, ep);
  const size_t M = size_t(N) * K;
  if (M == 0) return;
  const int threads = 256, blocks = int(std::min<size_t>((M + threads - 1) / threads, 4096));
  gate_grads_kernel<<<blocks, threads, 0, stream>>>(dw_NK, dgate_SK, slot_Nep, idx_NK, guest_NK, N, K, E, ep);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_ep_guest_rows(int32_t* gslot_NK, const int32_t* idx_NK, const int32_t* row_NK, const int32_t* offsets_E1,
                       const int32_t* guest_base_E, int N, int K, int E, cudaStream_t stream) {
  check_sizes("moe_ep_guest_rows", N, K, E, 1);
  const int M = N * K;
  if (M == 0) return;
  const int threads = 256, blocks = std::min((M + threads - 1) / threads, 4096);
  guest_rows_kernel<<<blocks, threads, 0, stream>>>(gslot_NK, idx_NK, row_NK, offsets_E1, guest_base_E, M, E);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_ep_home_sum(__nv_bfloat16* y_ND, const __nv_bfloat16* ys_SD, const int32_t* slot_Nep,
                     const __nv_bfloat16* guest_ND, int N, int ep, int D, cudaStream_t stream) {
  moe_gather_sum_add(y_ND, ys_SD, nullptr, slot_Nep, guest_ND, N, ep, D, stream);
}

}  // namespace mop::cuda
