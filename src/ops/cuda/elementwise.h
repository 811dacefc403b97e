#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace mop::cuda {

// out = a + b (bf16, summed in fp32). out may alias a or b. The residual adds of the decoder.
void add_bf16(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, size_t n, cudaStream_t stream);
// out += a (fp32 <- bf16): accumulating an activation gradient into an fp32 buffer.
void accumulate_bf16_into_f32(float* out, const __nv_bfloat16* a, size_t n, cudaStream_t stream);

}  // namespace mop::cuda
