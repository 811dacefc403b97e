// Internal to grouped_matmul.cu: the CUTLASS 3 Hopper grouped GEMMs behind backend "cutlass".
// `experts` lists the non-empty experts in order (groups); shapes are validated by the caller.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace mop::cuda::detail {

// SMs a persistent grouped kernel launched by this thread may use (GroupedSmLimit; 0: all).
int grouped_sm_limit();

// Whether the CUTLASS kernels take these sizes (TMA: 16-byte aligned leading dimensions).
bool cutlass_grouped_supported(int I, int O);
// y_e = x_e @ w_e^T (bf16 out).
void cutlass_grouped_forward(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* w,
                             const int32_t* offsets_device, const int32_t* offsets_host, const std::vector<int>& experts,
                             int E, int I, int O, cudaStream_t stream);
// dx_e = dy_e @ w_e (bf16 out, written).
void cutlass_grouped_dgrad(__nv_bfloat16* dx, const __nv_bfloat16* dy, const __nv_bfloat16* w,
                           const int32_t* offsets_device, const int32_t* offsets_host, const std::vector<int>& experts,
                           int E, int I, int O, cudaStream_t stream);
// dw_e += dy_e^T @ x_e (fp32, accumulated).
void cutlass_grouped_wgrad(float* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x, const int32_t* offsets_device,
                           const int32_t* offsets_host, const std::vector<int>& experts, int E, int I, int O,
                           cudaStream_t stream);
// dw_e = bf16(dw_e + dy_e^T @ x_e) (fp32 sum, rounded once); overwrite: dw_e = bf16(dy_e^T @ x_e),
// dw not read.
void cutlass_grouped_wgrad(__nv_bfloat16* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                           const int32_t* offsets_device, const int32_t* offsets_host, const std::vector<int>& experts,
                           int E, int I, int O, bool overwrite, cudaStream_t stream);

}  // namespace mop::cuda::detail
