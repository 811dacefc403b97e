#include "ops/cuda/check.cuh"
#include "ops/cuda/elementwise.h"

namespace mop::cuda {

namespace {
constexpr int kThreads = 256;

static __global__ void add_bf16_kernel(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = __float2bfloat16(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}

// Eight bf16 per thread through one 128-bit load when the pointers allow it.
static __global__ void add_bf16_vec_kernel(uint4* out, const uint4* a, const uint4* b, size_t n8) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n8; i += stride) {
    uint4 va = a[i], vb = b[i], vo;
    const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&va);
    const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&vb);
    __nv_bfloat162* po = reinterpret_cast<__nv_bfloat162*>(&vo);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 fa = __bfloat1622float2(pa[j]), fb = __bfloat1622float2(pb[j]);
      po[j] = __floats2bfloat162_rn(fa.x + fb.x, fa.y + fb.y);
    }
    out[i] = vo;
  }
}

static __global__ void add_f32_kernel(float* out, const float* a, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) out[i] += a[i];
}

static __global__ void accumulate_kernel(float* out, const __nv_bfloat16* a, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) out[i] += __bfloat162float(a[i]);
}

// One thread per element (T = __nv_bfloat16) or per 8 of them (T = uint4) of an (N, width) block.
template <class T>
static __global__ void copy_rows_kernel(T* dst, size_t dst_stride, const T* src, size_t src_stride, size_t N,
                                        size_t width) {
  const size_t total = N * width, stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const size_t n = i / width, j = i % width;
    dst[n * dst_stride + j] = src[n * src_stride + j];
  }
}

int grid_for(size_t work) {
  size_t blocks = (work + kThreads - 1) / kThreads;
  return int(blocks < 65535 * 8 ? blocks : 65535 * 8);
}
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
}  // namespace

void add_bf16(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (n % 8 == 0 && aligned16(out) && aligned16(a) && aligned16(b)) {
    add_bf16_vec_kernel<<<grid_for(n / 8), kThreads, 0, stream>>>(reinterpret_cast<uint4*>(out),
                                                                   reinterpret_cast<const uint4*>(a),
                                                                   reinterpret_cast<const uint4*>(b), n / 8);
  } else {
    add_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, a, b, n);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

void add_f32(float* out, const float* a, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  add_f32_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, a, n);
  MOP_CUDA_LAUNCH_CHECK();
}

void accumulate_bf16_into_f32(float* out, const __nv_bfloat16* a, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  accumulate_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, a, n);
  MOP_CUDA_LAUNCH_CHECK();
}

void copy_rows_bf16(__nv_bfloat16* dst, size_t dst_stride, const __nv_bfloat16* src, size_t src_stride, size_t N,
                    size_t width, cudaStream_t stream) {
  if (N == 0 || width == 0) return;
  if (width % 8 == 0 && dst_stride % 8 == 0 && src_stride % 8 == 0 && aligned16(dst) && aligned16(src)) {
    copy_rows_kernel<<<grid_for(N * width / 8), kThreads, 0, stream>>>(
        reinterpret_cast<uint4*>(dst), dst_stride / 8, reinterpret_cast<const uint4*>(src), src_stride / 8, N, width / 8);
  } else {
    copy_rows_kernel<<<grid_for(N * width), kThreads, 0, stream>>>(dst, dst_stride, src, src_stride, N, width);
  }
  MOP_CUDA_LAUNCH_CHECK();
}

}  // namespace mop::cuda
