// MoE router on the GPU: the CPU op's semantics (ops/cpu/router.h) with fp32 storage.
// Logits come from the router GEMM in fp32; probs and combine weights are fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "ops/cpu/router.h"

namespace mop::cuda {

// probs_NE = softmax or sigmoid of logits_NE; idx_NK = the K selected experts ranked by
// probs + bias_E (bias may be null), highest first, ties to the lower expert index, group-limited
// when cfg.n_groups > 1; w_NK = routed_scale * p_sel / (norm_topk ? sum_k p_sel : 1).
// The math runs in fp64 per token (cheap: E <= a few hundred), so probs and the selection agree
// with the CPU reference. One warp per token. Throws mop::Error on a bad config.
void router_forward(float* probs_NE, int32_t* idx_NK, float* w_NK, const float* logits_NE, const float* bias_E,
                    const cpu::RouterConfig& cfg, int N, cudaStream_t stream);

// dlogits_NE (written) from dw_NK through the combine weights with the selection held fixed, plus
// dprobs_NE (may be null: the load-balancing loss's gradient). Expert ids outside [0, E) are
// skipped (the CPU op throws; a kernel cannot).
void router_backward(float* dlogits_NE, const float* dw_NK, const float* dprobs_NE, const float* probs_NE,
                     const int32_t* idx_NK, const cpu::RouterConfig& cfg, int N, cudaStream_t stream);

// counts_E[e] = number of the N*K assignments that went to e (zeroed first; ids outside [0, E)
// are not counted).
void moe_expert_counts(int32_t* counts_E, const int32_t* idx_NK, int N, int E, int K, cudaStream_t stream);

// loss_1[0] = cpu::moe_lb_loss_forward's value: E * sum_e counts_e / (N K) * mean_n probs[n, e].
// probs_mean_E is scratch (E floats) that receives mean_n probs[n, e]. Deterministic: fixed-order
// fp64 column sums, then one block sums over e in a fixed order. N == 0 or K == 0 gives 0.
void moe_lb_loss(float* loss_1, float* probs_mean_E, const float* probs_NE, const int32_t* counts_E, int N, int E,
                 int K, cudaStream_t stream);

// dprobs_NE[n, e] += float(dloss * E * (counts_e / (N K)) / N), as the CPU op.
void moe_lb_loss_backward(float* dprobs_NE, float dloss, const int32_t* counts_E, int N, int E, int K,
                          cudaStream_t stream);

}  // namespace mop::cuda
