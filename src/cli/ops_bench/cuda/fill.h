// Device-side random fills for the op benchmark: inputs of several GiB drawn on the GPU (a host
// draw and upload would take longer than the benchmark). Never zeros: a matrix product ran 13%
// faster on zeros than on random data on this workplace's H200, and zeros hide unwritten outputs.
// Values come from a counter-based hash of (seed, index), so a fill does not depend on the grid.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mop::bench {

// x[i] uniform in [lo, hi).
void fill_uniform(__nv_bfloat16* x, size_t n, uint64_t seed, float lo, float hi, cudaStream_t stream);
void fill_uniform(float* x, size_t n, uint64_t seed, float lo, float hi, cudaStream_t stream);
// x[i] uniform in [0, bound) (token ids, targets).
void fill_ids(int32_t* x, size_t n, uint64_t seed, int32_t bound, cudaStream_t stream);
// Top-k expert ids per token: idx[n*K + k] = (e0(n) + k * (E / K)) mod E with e0 a hash of n, so a
// token's K experts are distinct and the loads are near uniform (routing as a load-balancing loss
// leaves it, not the all-tokens-on-one-expert worst case).
void fill_topk_ids(int32_t* idx_NK, int N, int K, int E, uint64_t seed, cudaStream_t stream);

}  // namespace mop::bench
