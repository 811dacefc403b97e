// RMSNorm (and the residual-add fused into it); mirrors mop::cpu::rmsnorm_*, with bf16 storage,
// fp32 statistics and accumulation.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace mop::cuda {

// y = x * rstd * w with rstd = 1 / sqrt(mean_d(x^2) + eps) (fp32, saved for backward in rstd_N;
// rstd_N may be nullptr when no backward follows).
void rmsnorm_forward(__nv_bfloat16* y_ND, float* rstd_N, const __nv_bfloat16* x_ND, const __nv_bfloat16* w_D, int N,
                     int D, float eps, cudaStream_t stream);

// r = bf16(resid + x) is stored in resid_out and normalised: y = rmsnorm(r). The statistics are
// those of the rounded r, so backward takes resid_out as its x. resid_out may alias resid or x
// (in-place residual stream); y must not alias any input.
void rmsnorm_residual_forward(__nv_bfloat16* resid_out_ND, __nv_bfloat16* y_ND, float* rstd_N,
                              const __nv_bfloat16* resid_ND, const __nv_bfloat16* x_ND, const __nv_bfloat16* w_D,
                              int N, int D, float eps, cudaStream_t stream);

// Floats of device scratch rmsnorm_backward needs: one partial dw row per block.
size_t rmsnorm_backward_scratch_floats(int N, int D);

// dx written (bf16), dw accumulated (+=, fp32) deterministically: each block sums dw over a fixed
// range of rows into its scratch row, then the rows are added in a fixed order. No atomics.
void rmsnorm_backward(__nv_bfloat16* dx_ND, float* dw_D, const __nv_bfloat16* dy_ND, const __nv_bfloat16* x_ND,
                      const __nv_bfloat16* w_D, const float* rstd_N, int N, int D, float* scratch,
                      cudaStream_t stream);

// Same with bf16 weight gradients: dw = bf16(dw + sum), the sum in fp32, rounded once.
void rmsnorm_backward(__nv_bfloat16* dx_ND, __nv_bfloat16* dw_D, const __nv_bfloat16* dy_ND,
                      const __nv_bfloat16* x_ND, const __nv_bfloat16* w_D, const float* rstd_N, int N, int D,
                      float* scratch, cudaStream_t stream);

// dw_D[d] += sum_g partial_GD[g, d] (fp32), summed in a fixed order: deterministic. The second
// stage of the per-block-partials reductions here and in qk_norm_rope_backward. The bf16 form
// adds in fp32 and rounds once.
void add_partial_rows(float* dw_D, const float* partial_GD, int G, int D, cudaStream_t stream);
void add_partial_rows(__nv_bfloat16* dw_D, const float* partial_GD, int G, int D, cudaStream_t stream);

}  // namespace mop::cuda
