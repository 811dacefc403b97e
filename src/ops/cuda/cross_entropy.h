// Fused cross-entropy over bf16 LM-head logits (the CPU op: ops/cpu/cross_entropy.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace mop::cuda {

// One block per row, fp32 online max / sum over V (V up to a few hundred thousand):
//   lse[n] = log sum_v exp(logits[n, v]), loss[n] = lse[n] - logits[n, target[n]],
//   dlogits[n] = dscale * (softmax(logits[n]) - onehot(target[n])) in bf16.
// dlogits may alias logits (each row is read fully for its statistics before any write, and each
// element is read before it is overwritten) and may be null (forward only). Rows with target < 0
// (ignored) get loss 0, lse 0 and zero dlogits. A target >= V gives loss = lse = NaN (the CPU op
// throws; a kernel cannot) and zero dlogits.
void cross_entropy_forward_backward(float* loss_N, float* lse_N, __nv_bfloat16* dlogits_NV,
                                    const __nv_bfloat16* logits_NV, const int32_t* targets_N, int N, int V,
                                    float dscale, cudaStream_t stream);

// out_1[0] (device) = sum_n loss_N[n] in fp64, fixed order (one block): deterministic.
void sum_losses(double* out_1, const float* loss_N, int N, cudaStream_t stream);

}  // namespace mop::cuda
