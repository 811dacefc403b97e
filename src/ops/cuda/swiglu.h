// SwiGLU on the fused gate|up GEMM output; mirrors mop::cpu::swiglu_* (silu computed in fp32).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mop::cuda {

// h[n, f] = silu(g[n, f]) * u[n, f], where row n of gu_N2F is [g (F) | u (F)].
void swiglu_forward(__nv_bfloat16* h_NF, const __nv_bfloat16* gu_N2F, int N, int F, cudaStream_t stream);
// dgu written (not accumulated): dg = dh u silu'(g), du = dh silu(g).
void swiglu_backward(__nv_bfloat16* dgu_N2F, const __nv_bfloat16* dh_NF, const __nv_bfloat16* gu_N2F, int N, int F,
                     cudaStream_t stream);

}  // namespace mop::cuda
