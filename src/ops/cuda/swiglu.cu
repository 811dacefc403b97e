#include "ops/cuda/swiglu.h"

#include <algorithm>
#include <cstdint>

#include "ops/cuda/bf16_vec.cuh"
#include "ops/cuda/check.cuh"

namespace mop::cuda {

namespace {

constexpr int kThreads = 256;
constexpr size_t kMaxBlocks = 8192;

inline unsigned grid_for(size_t work) {
  return unsigned(std::min(kMaxBlocks, std::max<size_t>(1, (work + kThreads - 1) / kThreads)));
}
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Never NaN: for very negative g, expf(-g) = inf and the sigmoid is 0 (as in the CPU op).
__device__ inline float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// Flat index over N x F / kVec vectors; row and column recovered by one division.
template <int kVec>
__global__ void swiglu_forward_kernel(__nv_bfloat16* h_NF, const __nv_bfloat16* gu_N2F, int N, int F) {
  const size_t vecs_per_row = size_t(F) / kVec, total = size_t(N) * vecs_per_row;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t n = i / vecs_per_row, f = (i - n * vecs_per_row) * kVec;
    const __nv_bfloat16* g_ptr = gu_N2F + n * 2 * F + f;
    const F32Vec<kVec> g = load_vec<kVec>(g_ptr), u = load_vec<kVec>(g_ptr + F);
    F32Vec<kVec> h;
#pragma unroll
    for (int k = 0; k < kVec; ++k) h.v[k] = g.v[k] * sigmoid(g.v[k]) * u.v[k];
    store_vec<kVec>(h_NF + n * F + f, h);
  }
}

// silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
template <int kVec>
__global__ void swiglu_backward_kernel(__nv_bfloat16* dgu_N2F, const __nv_bfloat16* dh_NF,
                                       const __nv_bfloat16* gu_N2F, int N, int F) {
  const size_t vecs_per_row = size_t(F) / kVec, total = size_t(N) * vecs_per_row;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t n = i / vecs_per_row, f = (i - n * vecs_per_row) * kVec;
    const __nv_bfloat16* g_ptr = gu_N2F + n * 2 * F + f;
    const F32Vec<kVec> g = load_vec<kVec>(g_ptr), u = load_vec<kVec>(g_ptr + F), dh = load_vec<kVec>(dh_NF + n * F + f);
    F32Vec<kVec> dg, du;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float s = sigmoid(g.v[k]);
      dg.v[k] = dh.v[k] * u.v[k] * s * (1.f + g.v[k] * (1.f - s));
      du.v[k] = dh.v[k] * g.v[k] * s;
    }
    __nv_bfloat16* dg_ptr = dgu_N2F + n * 2 * F + f;
    store_vec<kVec>(dg_ptr, dg);
    store_vec<kVec>(dg_ptr + F, du);
  }
}

void check_shape(const char* op, int N, int F) {
  MOP_CHECK(N >= 0 && F >= 0, "{}: bad shape N={} F={}", op, N, F);
}

}  // namespace

void swiglu_forward(__nv_bfloat16* h_NF, const __nv_bfloat16* gu_N2F, int N, int F, cudaStream_t stream) {
  check_shape("swiglu_forward", N, F);
  if (N == 0 || F == 0) return;
  MOP_CHECK(h_NF && gu_N2F, "swiglu_forward: null pointer");
  const size_t total = size_t(N) * F;
  if (F % 8 == 0 && aligned16(h_NF) && aligned16(gu_N2F)) {
    swiglu_forward_kernel<8><<<grid_for(total / 8), kThreads, 0, stream>>>(h_NF, gu_N2F, N, F);
  } else {
    swiglu_forward_kernel<1><<<grid_for(total), kThreads, 0, stream>>>(h_NF, gu_N2F, N, F);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

void swiglu_backward(__nv_bfloat16* dgu_N2F, const __nv_bfloat16* dh_NF, const __nv_bfloat16* gu_N2F, int N, int F,
                     cudaStream_t stream) {
  check_shape("swiglu_backward", N, F);
  if (N == 0 || F == 0) return;
  MOP_CHECK(dgu_N2F && dh_NF && gu_N2F, "swiglu_backward: null pointer");
  const size_t total = size_t(N) * F;
  if (F % 8 == 0 && aligned16(dgu_N2F) && aligned16(dh_NF) && aligned16(gu_N2F)) {
    swiglu_backward_kernel<8><<<grid_for(total / 8), kThreads, 0, stream>>>(dgu_N2F, dh_NF, gu_N2F, N, F);
  } else {
    swiglu_backward_kernel<1><<<grid_for(total), kThreads, 0, stream>>>(dgu_N2F, dh_NF, gu_N2F, N, F);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace mop::cuda
