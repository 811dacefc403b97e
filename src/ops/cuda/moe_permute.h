// Dropless MoE dispatch on the GPU: the CPU op's layout (ops/cpu/moe_permute.h) and bf16 row ops.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mop::cuda {

// Bytes of scratch moe_route_layout needs for these sizes (sort buffers plus CUB's temporary
// storage). Queries CUB, so it needs a device, but does not synchronise.
size_t moe_route_layout_workspace(int N, int E, int K);

// Exactly cpu::moe_route_layout: assignment (n, k) goes to row row_NK[n*K + k]; expert e owns rows
// [offsets_E1[e], offsets_E1[e+1]); within an expert, rows follow (n, k) order. A stable radix
// sort of the expert ids carrying the assignment index, then a scatter and a binary search per
// expert for the offsets. No host sync. Ids outside [0, E) are sorted past the last expert (rows
// >= offsets_E1[E]) instead of throwing as the CPU op does.
void moe_route_layout(int32_t* row_NK, int32_t* offsets_E1, const int32_t* idx_NK, int N, int E, int K,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream);

// xp[row_NK[n,k]] = x[n] (bit copies). M = N*K rows of D.
void moe_permute(__nv_bfloat16* xp_MD, const __nv_bfloat16* x_ND, const int32_t* row_NK, int N, int K, int D,
                 cudaStream_t stream);
// dx[n] = sum_k dxp[row_NK[n,k]], fp32 sum in k order, written.
void moe_permute_backward(__nv_bfloat16* dx_ND, const __nv_bfloat16* dxp_MD, const int32_t* row_NK, int N, int K,
                          int D, cudaStream_t stream);
// y[n] = sum_k w[n,k] * src[row_NK[n,k]] (w null: weights 1), then + add[n] (add null: nothing),
// fp32 in that order, written: the two ops above with an addend (the expert-parallel sum at home
// with a balanced layer's guest rows, ops/cuda/moe_ep.h).
void moe_gather_sum_add(__nv_bfloat16* y_ND, const __nv_bfloat16* src_MD, const float* w_NK, const int32_t* row_NK,
                        const __nv_bfloat16* add_ND, int N, int K, int D, cudaStream_t stream);
// y[n] = sum_k w[n,k] * yp[row_NK[n,k]], fp32 in k order, written.
void moe_combine(__nv_bfloat16* y_ND, const __nv_bfloat16* yp_MD, const float* w_NK, const int32_t* row_NK, int N,
                 int K, int D, cudaStream_t stream);
// dyp[row] = w[n,k] * dy[n]; dw[n,k] = dy[n] . yp[row] (fp32 dot, one warp per (n, k), fixed
// order); both written.
void moe_combine_backward(__nv_bfloat16* dyp_MD, float* dw_NK, const __nv_bfloat16* dy_ND,
                          const __nv_bfloat16* yp_MD, const float* w_NK, const int32_t* row_NK, int N, int K, int D,
                          cudaStream_t stream);

}  // namespace mop::cuda
