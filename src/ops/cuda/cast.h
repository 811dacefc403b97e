// Element-wise dtype casts between fp32 and bf16 (master weights <-> bf16 copies, fp32 grads).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace mop::cuda {

// out[i] = bf16(in[i]), round to nearest even (inf and NaN kept; NaN payload not preserved).
void cast_f32_to_bf16(__nv_bfloat16* out, const float* in, size_t n, cudaStream_t stream);
// out[i] = float(in[i]) (exact).
void cast_bf16_to_f32(float* out, const __nv_bfloat16* in, size_t n, cudaStream_t stream);

}  // namespace mop::cuda
