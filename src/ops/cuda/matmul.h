// Dense GEMMs of the linear layers through cuBLASLt. Same math as ops/cpu/matmul.h: weights in
// PyTorch Linear layout (out x in), y = x @ w^T; bf16 storage, fp32 accumulation.
// Row-major throughout; no host synchronisation. Deterministic (see blas.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace mop::cuda {

// y_NO = x_NI @ w_OI^T, bf16 out. N may be 0 (nothing to do); I, O > 0.
void matmul_forward(__nv_bfloat16* y_NO, const __nv_bfloat16* x_NI, const __nv_bfloat16* w_OI, int N, int I, int O,
                    cudaStream_t stream);
// Same, fp32 out (router logits).
void matmul_forward_f32out(float* y_NO, const __nv_bfloat16* x_NI, const __nv_bfloat16* w_OI, int N, int I, int O,
                           cudaStream_t stream);
// dx_NI = dy_NO @ w_OI written in bf16 (skipped when dx is null);
// dw_OI += dy_NO^T @ x_NI accumulated in fp32 (skipped when dw is null; unchanged when N == 0).
void matmul_backward(__nv_bfloat16* dx_NI, float* dw_OI, const __nv_bfloat16* dy_NO, const __nv_bfloat16* x_NI,
                     const __nv_bfloat16* w_OI, int N, int I, int O, cudaStream_t stream);
// Same with bf16 weight gradients: dw = bf16(dw + dy^T @ x), the sum formed in fp32 and rounded once.
void matmul_backward(__nv_bfloat16* dx_NI, __nv_bfloat16* dw_OI, const __nv_bfloat16* dy_NO,
                     const __nv_bfloat16* x_NI, const __nv_bfloat16* w_OI, int N, int I, int O, cudaStream_t stream);
// dx only (dw = nullptr picks no overload above by itself).
inline void matmul_backward(__nv_bfloat16* dx_NI, std::nullptr_t, const __nv_bfloat16* dy_NO,
                            const __nv_bfloat16* x_NI, const __nv_bfloat16* w_OI, int N, int I, int O,
                            cudaStream_t stream) {
  matmul_backward(dx_NI, static_cast<float*>(nullptr), dy_NO, x_NI, w_OI, N, I, O, stream);
}

}  // namespace mop::cuda
