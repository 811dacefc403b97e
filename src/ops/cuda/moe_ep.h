// The token-once expert-parallel exchange's index kernels (parallel/token_exchange.h): which rows a
// rank sends and where each (token, expert) pair lands on its expert's owner. The rows themselves
// move with moe_permute.h's kernels, whose row maps may hold -1 (skipped):
//   send rows      moe_permute(xs_SD, x_ND, slot_Nep, N, ep, D)          (scatter, one copy per rank)
//   owner's pairs  moe_permute(xl_RD, xr_RtD, pos_RtK, Rt, K, D)
//   partial sums   moe_combine(pr_RtD, yl_RD, gate_RtK, pos_RtK, Rt, K, D) (gate-weighted, per token)
//   back home      moe_permute_backward(y_ND, ys_SD, slot_Nep, N, ep, D) (sum over the ranks)
// Experts are split evenly: global expert e is owned by rank e / (E / ep); ids outside [0, E) are
// no pair. Balanced layers (parallel/expert_balance.h) add guest rows, the source's own pairs of
// lent experts, computed where they were routed:
//   guest rows     moe_ep_guest_rows -> gslot_NK; moe_permute(xg_RgD, x_ND, gslot_NK, N, K, D)
//   guest outputs  moe_combine(yg_ND, yg_RgD, w_NK, gslot_NK, N, K, D), added at home by
//                  moe_ep_home_sum
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace mop::cuda {

// tokens_ep[r] = how many of the N tokens have at least one expert on rank r. No host sync.
void moe_ep_token_counts(int32_t* tokens_ep, const int32_t* idx_NK, int N, int K, int E, int ep, cudaStream_t stream);

// This rank's row of the exchange plan's all-gather (parallel/token_exchange.h), W = E + ep:
// row_W[e] = offsets_E1[e + 1] - offsets_E1[e] (its pairs per global expert), row_W[E + r] =
// tokens_ep[r]. Gathered on the device, it spares the layer a host round trip.
void moe_ep_plan_row(int64_t* row_W, const int32_t* offsets_E1, const int32_t* tokens_ep, int E, int ep,
                     cudaStream_t stream);

// The send layout, given tokens_ep (device, from moe_ep_token_counts) and dest_base_E (device,
// TokenExchangePlan::dest_base). Rank r's rows are [sum of tokens_ep[< r], + tokens_ep[r]), tokens
// in ascending order. slot_Nep[n, r]: token n's row for rank r, or -1. For sent row s of token n
// and each k: pos_SK[s, k] = dest_base_E[e] + row_NK[n, k] - offsets_E1[e] when e = idx[n, k] is on
// the row's rank and dest_base_E[e] >= 0 (the pair's row among the owner's expert-major rows),
// else -1 (dest_base -1: the pair moved to a guest row here); gate_SK[s, k] = w_NK[n, k], or 0.
void moe_ep_send_layout(int32_t* slot_Nep, int32_t* pos_SK, float* gate_SK, const int32_t* idx_NK, const float* w_NK,
                        const int32_t* row_NK, const int32_t* offsets_E1, const int32_t* dest_base_E,
                        const int32_t* tokens_ep, int N, int K, int E, int ep, cudaStream_t stream);

// Gate gradients back to their pairs: dw_NK[n, k] = dgate_SK[slot[n, owner(idx[n, k])], k]
// (0 for an id outside [0, E)), plus guest_NK[n, k] when given (the guest pairs' gate gradients,
// 0 elsewhere; a guest pair's owner-side gradient is 0: exact).
void moe_ep_gate_grads(float* dw_NK, const float* dgate_SK, const int32_t* slot_Nep, const int32_t* idx_NK, int N,
                       int K, int E, int ep, cudaStream_t stream, const float* guest_NK = nullptr);

// Guest rows: gslot_NK[n, k] = guest_base_E[e] + row_NK[n, k] - offsets_E1[e] for e = idx[n, k]
// with guest_base_E[e] >= 0 (TokenExchangePlan::guest_base: the pair is computed here), else -1.
void moe_ep_guest_rows(int32_t* gslot_NK, const int32_t* idx_NK, const int32_t* row_NK, const int32_t* offsets_E1,
                       const int32_t* guest_base_E, int N, int K, int E, cudaStream_t stream);

// At home: y[n] = sum over ranks r of ys[slot[n, r]] (rows with slot -1 skipped), then + guest[n]
// when given, in fp32, rounded once. Without guest it is moe_permute_backward(y, ys, slot, N, ep, D).
void moe_ep_home_sum(__nv_bfloat16* y_ND, const __nv_bfloat16* ys_SD, const int32_t* slot_Nep,
                     const __nv_bfloat16* guest_ND, int N, int ep, int D, cudaStream_t stream);

}  // namespace mop::cuda
