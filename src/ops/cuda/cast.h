// Element-wise dtype casts between fp32 and bf16 (master weights <-> bf16 copies, fp32 grads).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mop::cuda {

// out[i] = bf16(in[i]), round to nearest even (inf and NaN kept; NaN payload not preserved).
void cast_f32_to_bf16(__nv_bfloat16* out, const float* in, size_t n, cudaStream_t stream);
// out[i] = float(in[i]) (exact).
void cast_bf16_to_f32(float* out, const __nv_bfloat16* in, size_t n, cudaStream_t stream);

// fp32 <-> the split master layout of split_f32.cuh (hi: the bf16 compute copy, lo: the low 16 bits).
// merge(split(p)) == p bit for bit for every non-NaN p.
void split_master(__nv_bfloat16* hi, uint16_t* lo, const float* in, size_t n, cudaStream_t stream);
void merge_master(float* out, const __nv_bfloat16* hi, const uint16_t* lo, size_t n, cudaStream_t stream);

}  // namespace mop::cuda
