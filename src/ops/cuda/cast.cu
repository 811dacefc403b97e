#include "ops/cuda/cast.h"

#include <algorithm>
#include <cstdint>

#include "ops/cuda/check.cuh"
#include "ops/cuda/split_f32.cuh"

namespace mop::cuda {

namespace {

constexpr int kThreads = 256;
// Grid-stride: enough blocks to fill an H200 several times over, no more.
constexpr size_t kMaxBlocks = 4096;

inline unsigned grid_for(size_t work) {
  return unsigned(std::min(kMaxBlocks, std::max<size_t>(1, (work + kThreads - 1) / kThreads)));
}
inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Vector path: 4 floats (16 B) in, 4 bf16 (8 B) out per step; the n % 4 tail is done scalar.
template <bool kVec>
__global__ void f32_to_bf16_kernel(__nv_bfloat16* out, const float* in, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  size_t done = 0;
  if constexpr (kVec) {
    const size_t n_vec = n / 4;
    for (size_t v = i; v < n_vec; v += stride) {
      const float4 x = reinterpret_cast<const float4*>(in)[v];
      __nv_bfloat162 lo = __floats2bfloat162_rn(x.x, x.y), hi = __floats2bfloat162_rn(x.z, x.w);
      uint2 packed;
      packed.x = *reinterpret_cast<uint32_t*>(&lo);
      packed.y = *reinterpret_cast<uint32_t*>(&hi);
      reinterpret_cast<uint2*>(out)[v] = packed;
    }
    done = n_vec * 4;
  }
  for (size_t j = done + i; j < n; j += stride) out[j] = __float2bfloat16_rn(in[j]);
}

// Vector path: 8 bf16 (16 B) in, 8 floats (2 x 16 B) out per step.
template <bool kVec>
__global__ void bf16_to_f32_kernel(float* out, const __nv_bfloat16* in, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  size_t done = 0;
  if constexpr (kVec) {
    const size_t n_vec = n / 8;
    for (size_t v = i; v < n_vec; v += stride) {
      const uint4 raw = reinterpret_cast<const uint4*>(in)[v];
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
      const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
      const float2 c = __bfloat1622float2(h[2]), d = __bfloat1622float2(h[3]);
      float4* o = reinterpret_cast<float4*>(out) + 2 * v;
      o[0] = make_float4(a.x, a.y, b.x, b.y);
      o[1] = make_float4(c.x, c.y, d.x, d.y);
    }
    done = n_vec * 8;
  }
  for (size_t j = done + i; j < n; j += stride) out[j] = __bfloat162float(in[j]);
}

// Scalar loops: these run at upload and checkpoint time only, a chunk at a time.
__global__ void split_kernel(uint16_t* hi, uint16_t* lo, const float* in, size_t n) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    split_f32(in[i], hi[i], lo[i]);
}
__global__ void merge_kernel(float* out, const uint16_t* hi, const uint16_t* lo, size_t n) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    out[i] = merge_f32(hi[i], lo[i]);
}

}  // namespace

void split_master(__nv_bfloat16* hi, uint16_t* lo, const float* in, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  MOP_CHECK(hi && lo && in, "split_master: null pointer");
  split_kernel<<<grid_for(n), kThreads, 0, stream>>>(reinterpret_cast<uint16_t*>(hi), lo, in, n);
  MOP_CUDA_LAUNCH_CHECK();
}

void merge_master(float* out, const __nv_bfloat16* hi, const uint16_t* lo, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  MOP_CHECK(out && hi && lo, "merge_master: null pointer");
  merge_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, reinterpret_cast<const uint16_t*>(hi), lo, n);
  MOP_CUDA_LAUNCH_CHECK();
}

void cast_f32_to_bf16(__nv_bfloat16* out, const float* in, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  MOP_CHECK(out && in, "cast_f32_to_bf16: null pointer");
  if (aligned(in, 16) && aligned(out, 8)) {
    f32_to_bf16_kernel<true><<<grid_for(n / 4 + 1), kThreads, 0, stream>>>(out, in, n);
  } else {
    f32_to_bf16_kernel<false><<<grid_for(n), kThreads, 0, stream>>>(out, in, n);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

void cast_bf16_to_f32(float* out, const __nv_bfloat16* in, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  MOP_CHECK(out && in, "cast_bf16_to_f32: null pointer");
  if (aligned(in, 16) && aligned(out, 16)) {
    bf16_to_f32_kernel<true><<<grid_for(n / 8 + 1), kThreads, 0, stream>>>(out, in, n);
  } else {
    bf16_to_f32_kernel<false><<<grid_for(n), kThreads, 0, stream>>>(out, in, n);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace mop::cuda
