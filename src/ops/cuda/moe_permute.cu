#include "ops/cuda/moe_permute.h"

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <type_traits>

#include "ops/cuda/bf16_vec.cuh"
#include "ops/cuda/check.cuh"

namespace mop::cuda {

using bf16 = __nv_bfloat16;

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;
constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Keys are expert ids in [0, E] (E marks an invalid id): the radix sort only looks at these bits.
int key_bits(int E) {
  int bits = 1;
  while ((int64_t(1) << bits) <= E) ++bits;
  return bits;
}

size_t cub_sort_bytes(int M, int E) {
  size_t bytes = 0;
  MOP_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                                 static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                 static_cast<int32_t*>(nullptr), M, 0, key_bits(E)));
  return bytes;
}

// Workspace: keys in/out, values in/out (M each), then CUB's storage; each part 256-aligned.
struct LayoutScratch {
  uint32_t *keys_in, *keys_out;
  int32_t *vals_in, *vals_out;
  void* cub_tmp;
  size_t cub_bytes;
};
size_t layout_bytes(int M, int E, LayoutScratch* s, char* base) {
  const size_t part = align_up(sizeof(int32_t) * size_t(M));
  const size_t cub_bytes = cub_sort_bytes(M, E);
  if (s) {
    s->keys_in = reinterpret_cast<uint32_t*>(base);
    s->keys_out = reinterpret_cast<uint32_t*>(base + part);
    s->vals_in = reinterpret_cast<int32_t*>(base + 2 * part);
    s->vals_out = reinterpret_cast<int32_t*>(base + 3 * part);
    s->cub_tmp = base + 4 * part;
    s->cub_bytes = cub_bytes;
  }
  return 4 * part + align_up(cub_bytes) + kAlign;  // + kAlign: room to align an unaligned base
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

static __global__ void layout_prepare_kernel(uint32_t* keys, int32_t* vals, const int32_t* idx, int M, int E) {
  for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < M; a += gridDim.x * blockDim.x) {
    const int e = idx[a];
    keys[a] = (e >= 0 && e < E) ? uint32_t(e) : uint32_t(E);
    vals[a] = a;
  }
}

static __global__ void layout_scatter_kernel(int32_t* row_NK, const int32_t* sorted_vals, int M) {
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < M; r += gridDim.x * blockDim.x) row_NK[sorted_vals[r]] = r;
}

// offsets[e] = first sorted position whose key is >= e (binary search), for e in [0, E].
static __global__ void layout_offsets_kernel(int32_t* offsets_E1, const uint32_t* sorted_keys, int M, int E) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e > E) return;
  int lo = 0, hi = M;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (sorted_keys[mid] < uint32_t(e)) lo = mid + 1;
    else hi = mid;
  }
  offsets_E1[e] = lo;
}

// W = 8: one 16-byte vector of bf16 per step (D % 8 == 0, aligned); W = 1: scalar fallback.
template <int W> using Raw = std::conditional_t<W == 8, uint4, unsigned short>;

// One warp per token: lane L handles elements [c, c + W) for c = L*W, L*W + 32*W, ...
// Rows outside [0, N*K) are skipped (a corrupt layout must not write out of bounds).
template <int W>
static __global__ void permute_kernel(bf16* __restrict__ xp_MD, const bf16* __restrict__ x_ND,
                                      const int32_t* __restrict__ row_NK, int N, int K, int D) {
  const int n = int((size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32;
  if (n >= N) return;
  const unsigned M = unsigned(N) * unsigned(K);
  for (int c = lane * W; c < D; c += 32 * W) {
    const Raw<W> v = *reinterpret_cast<const Raw<W>*>(x_ND + size_t(n) * D + c);
    for (int k = 0; k < K; ++k) {
      const int r = row_NK[size_t(n) * K + k];
      if (unsigned(r) < M) *reinterpret_cast<Raw<W>*>(xp_MD + size_t(r) * D + c) = v;
    }
  }
}

// y[n] = sum_k w_k * src[row_k] (w == nullptr: weights 1), fp32 accumulation in k order.
template <int W>
static __global__ void gather_sum_kernel(bf16* __restrict__ y_ND, const bf16* __restrict__ src_MD,
                                         const float* __restrict__ w_NK, const int32_t* __restrict__ row_NK,
                                         const bf16* __restrict__ add_ND, int N, int K, int D) {
  const int n = int((size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32;
  if (n >= N) return;
  const unsigned M = unsigned(N) * unsigned(K);
  for (int c = lane * W; c < D; c += 32 * W) {
    float acc[W], v[W];
#pragma unroll
    for (int j = 0; j < W; ++j) acc[j] = 0.f;
    for (int k = 0; k < K; ++k) {
      const int r = row_NK[size_t(n) * K + k];
      if (unsigned(r) >= M) continue;
      const float wk = w_NK ? w_NK[size_t(n) * K + k] : 1.f;
      load_f32<W>(src_MD + size_t(r) * D + c, v);
#pragma unroll
      for (int j = 0; j < W; ++j) acc[j] += wk * v[j];
    }
    if (add_ND) {
      load_f32<W>(add_ND + size_t(n) * D + c, v);
#pragma unroll
      for (int j = 0; j < W; ++j) acc[j] += v[j];
    }
    store_bf16<W>(y_ND + size_t(n) * D + c, acc);
  }
}

// One warp per assignment a = n*K + k: dyp[row] = w * dy[n] and dw[a] = dy[n] . yp[row]; each
// lane sums its elements in order, then a fixed butterfly: deterministic.
template <int W>
static __global__ void combine_backward_kernel(bf16* __restrict__ dyp_MD, float* __restrict__ dw_NK,
                                               const bf16* __restrict__ dy_ND, const bf16* __restrict__ yp_MD,
                                               const float* __restrict__ w_NK, const int32_t* __restrict__ row_NK,
                                               int N, int K, int D) {
  const size_t a = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const size_t M = size_t(N) * K;
  if (a >= M) return;
  const int r = row_NK[a];
  const bool valid = r >= 0 && size_t(r) < M;
  const size_t n = a / K;
  const float wk = w_NK[a];
  float dot = 0.f;
  if (valid) {
    for (int c = lane * W; c < D; c += 32 * W) {
      float dy[W], yp[W], g[W];
      load_f32<W>(dy_ND + n * D + c, dy);
      load_f32<W>(yp_MD + size_t(r) * D + c, yp);
#pragma unroll
      for (int j = 0; j < W; ++j) dot += dy[j] * yp[j], g[j] = wk * dy[j];
      store_bf16<W>(dyp_MD + size_t(r) * D + c, g);
    }
  }
  for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(kFull, dot, off);
  if (lane == 0) dw_NK[a] = dot;
}

static void check_sizes(const char* op, int N, int K, int D) {
  MOP_CHECK(N >= 0 && K >= 0 && D > 0, "{}: bad sizes N={} K={} D={}", op, N, K, D);
  MOP_CHECK(int64_t(N) * K < (int64_t(1) << 31), "{}: N*K={} does not fit int32 rows", op, int64_t(N) * K);
}
static int warp_blocks(size_t warps) { return int((warps + kWarpsPerBlock - 1) / kWarpsPerBlock); }

size_t moe_route_layout_workspace(int N, int E, int K) {
  MOP_CHECK(N >= 0 && E > 0 && K >= 0, "moe_route_layout: bad sizes N={} E={} K={}", N, E, K);
  MOP_CHECK(int64_t(N) * K < (int64_t(1) << 31), "moe_route_layout: N*K too large");
  const int M = N * K;
  return M == 0 ? 0 : layout_bytes(M, E, nullptr, nullptr);
}

void moe_route_layout(int32_t* row_NK, int32_t* offsets_E1, const int32_t* idx_NK, int N, int E, int K,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const size_t need = moe_route_layout_workspace(N, E, K);
  const int M = N * K;
  if (M == 0) {
    MOP_CUDA_CHECK(cudaMemsetAsync(offsets_E1, 0, sizeof(int32_t) * size_t(E + 1), stream));
    return;
  }
  MOP_CHECK(workspace && workspace_bytes >= need, "moe_route_layout: workspace of {} bytes, need {}",
            workspace_bytes, need);
  char* base = reinterpret_cast<char*>(align_up(reinterpret_cast<uintptr_t>(workspace)));
  LayoutScratch s;
  layout_bytes(M, E, &s, base);
  const int threads = 256;
  const int blocks = std::min((M + threads - 1) / threads, 4096);
  layout_prepare_kernel<<<blocks, threads, 0, stream>>>(s.keys_in, s.vals_in, idx_NK, M, E);
  MOP_CUDA_LAUNCH_CHECK();
  // Radix sort is stable: equal experts keep ascending assignment index, i.e. (n, k) order.
  MOP_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.cub_tmp, s.cub_bytes, s.keys_in, s.keys_out, s.vals_in, s.vals_out,
                                                 M, 0, key_bits(E), stream));
  layout_scatter_kernel<<<blocks, threads, 0, stream>>>(row_NK, s.vals_out, M);
  MOP_CUDA_LAUNCH_CHECK();
  layout_offsets_kernel<<<(E + 1 + threads - 1) / threads, threads, 0, stream>>>(offsets_E1, s.keys_out, M, E);
  MOP_CUDA_LAUNCH_CHECK();
}

void moe_permute(bf16* xp_MD, const bf16* x_ND, const int32_t* row_NK, int N, int K, int D, cudaStream_t stream) {
  check_sizes("moe_permute", N, K, D);
  if (N == 0 || K == 0) return;
  const int blocks = warp_blocks(size_t(N)), threads = 32 * kWarpsPerBlock;
  if (D % 8 == 0 && aligned16(xp_MD) && aligned16(x_ND))
    permute_kernel<8><<<blocks, threads, 0, stream>>>(xp_MD, x_ND, row_NK, N, K, D);
  else
    permute_kernel<1><<<blocks, threads, 0, stream>>>(xp_MD, x_ND, row_NK, N, K, D);
  MOP_CUDA_LAUNCH_CHECK();
}

static void gather_sum(bf16* y_ND, const bf16* src_MD, const float* w_NK, const int32_t* row_NK, int N, int K, int D,
                       cudaStream_t stream, const bf16* add_ND = nullptr) {
  if (N == 0) return;
  const int blocks = warp_blocks(size_t(N)), threads = 32 * kWarpsPerBlock;
  if (D % 8 == 0 && aligned16(y_ND) && aligned16(src_MD) && (!add_ND || aligned16(add_ND)))
    gather_sum_kernel<8><<<blocks, threads, 0, stream>>>(y_ND, src_MD, w_NK, row_NK, add_ND, N, K, D);
  else
    gather_sum_kernel<1><<<blocks, threads, 0, stream>>>(y_ND, src_MD, w_NK, row_NK, add_ND, N, K, D);
  MOP_CUDA_LAUNCH_CHECK();
}
void moe_gather_sum_add(bf16* y_ND, const bf16* src_MD, const float* w_NK, const int32_t* row_NK, const bf16* add_ND,
                        int N, int K, int D, cudaStream_t stream) {
  check_sizes("moe_gather_sum_add", N, K, D);
  gather_sum(y_ND, src_MD, w_NK, row_NK, N, K, D, stream, add_ND);
}

void moe_permute_backward(bf16* dx_ND, const bf16* dxp_MD, const int32_t* row_NK, int N, int K, int D,
                          cudaStream_t stream) {
  check_sizes("moe_permute_backward", N, K, D);
  gather_sum(dx_ND, dxp_MD, nullptr, row_NK, N, K, D, stream);  // K == 0 writes zeros, as the CPU op
}

void moe_combine(bf16* y_ND, const bf16* yp_MD, const float* w_NK, const int32_t* row_NK, int N, int K, int D,
                 cudaStream_t stream) {
  check_sizes("moe_combine", N, K, D);
  MOP_CHECK(w_NK || N * K == 0, "moe_combine: null weights");
  gather_sum(y_ND, yp_MD, w_NK, row_NK, N, K, D, stream);
}

void moe_combine_backward(bf16* dyp_MD, float* dw_NK, const bf16* dy_ND, const bf16* yp_MD, const float* w_NK,
                          const int32_t* row_NK, int N, int K, int D, cudaStream_t stream) {
  check_sizes("moe_combine_backward", N, K, D);
  const size_t M = size_t(N) * K;
  if (M == 0) return;
  const int blocks = warp_blocks(M), threads = 32 * kWarpsPerBlock;
  if (D % 8 == 0 && aligned16(dyp_MD) && aligned16(dy_ND) && aligned16(yp_MD))
    combine_backward_kernel<8><<<blocks, threads, 0, stream>>>(dyp_MD, dw_NK, dy_ND, yp_MD, w_NK, row_NK, N, K, D);
  else
    combine_backward_kernel<1><<<blocks, threads, 0, stream>>>(dyp_MD, dw_NK, dy_ND, yp_MD, w_NK, row_NK, N, K, D);
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace mop::cuda
