#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace mop::cuda {

// out = a + b (bf16, summed in fp32). out may alias a or b. The residual adds of the decoder.
void add_bf16(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, size_t n, cudaStream_t stream);
// out += a (fp32): a weight gradient computed elsewhere added to this rank's (balanced expert layers).
void add_f32(float* out, const float* a, size_t n, cudaStream_t stream);
// out += a (fp32 <- bf16): accumulating an activation gradient into an fp32 buffer.
void accumulate_bf16_into_f32(float* out, const __nv_bfloat16* a, size_t n, cudaStream_t stream);
// N rows of `width` bf16: dst[n * dst_stride + j] = src[n * src_stride + j], j < width. Splits a
// fused GEMM output into its parts and back (q|k|v), 16 bytes per thread when the strides, width
// and pointers allow. A kernel, not cudaMemcpy2DAsync: a device-to-device 2D copy with rows of
// 1-4 KB runs well below the memory bandwidth.
void copy_rows_bf16(__nv_bfloat16* dst, size_t dst_stride, const __nv_bfloat16* src, size_t src_stride, size_t N,
                    size_t width, cudaStream_t stream);

}  // namespace mop::cuda
