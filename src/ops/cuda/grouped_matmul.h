// Expert GEMMs over an expert-sorted buffer, same math as ops/cpu/grouped_matmul.h: rows
// [offsets[e], offsets[e+1]) belong to expert e and y[rows_e] = x[rows_e] @ w_EOI[e]^T.
// Weights (E, O, I) bf16; activations bf16; fp32 accumulation; dw accumulated in fp32.
//
// Offsets are passed twice, with the same E + 1 values: on the device (read by kernels) and on the
// host (group sizes for the library calls, which take them from host memory; the caller copies the
// offsets to the host once per MoE layer). No host synchronisation inside. Deterministic.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mop::cuda {

// Process-wide backend choice:
//  "cublas": cublasGemmGroupedBatchedEx for y and dx; one cublasGemmEx per non-empty expert for dw
//    (grouped cuBLAS has no bf16-in / fp32-out mode, and dw must accumulate in fp32).
//  "cutlass" (default): CUTLASS 3 Hopper persistent grouped GEMMs (one kernel per product, dw
//    included) when I and O are multiples of 8 (TMA alignment); other sizes take the cuBLAS path.
// Throws mop::Error for an unknown name.
void set_grouped_gemm_backend(const char* name);
const char* grouped_gemm_backend();

// While it lives, the CUTLASS grouped kernels this thread launches use at most `sms` SMs (their
// persistent grid, in whole 2-SM clusters, at least one; 0 or more than the GPU has: all). For
// work run beside communication: a persistent kernel holds its SMs to the end, so a collective
// launched after it on another stream would otherwise wait for it. The cuBLAS path is not limited.
class GroupedSmLimit {
 public:
  explicit GroupedSmLimit(int sms);
  ~GroupedSmLimit();
  GroupedSmLimit(const GroupedSmLimit&) = delete;
  GroupedSmLimit& operator=(const GroupedSmLimit&) = delete;

 private:
  int prev_;
};

void grouped_matmul_forward(__nv_bfloat16* y_MO, const __nv_bfloat16* x_MI, const __nv_bfloat16* w_EOI,
                            const int32_t* offsets_E1_device, const int32_t* offsets_E1_host, int E, int I, int O,
                            cudaStream_t stream);
// dx written in bf16 (skipped when null); dw_EOI += per-expert dy^T @ x in fp32 (skipped when null;
// experts with no rows are left unchanged).
// dw_overwrite: dw as if it were zero before (the first backward after zeroing the gradients),
// without zeroing or reading it: experts with no rows get zeros.
void grouped_matmul_backward(__nv_bfloat16* dx_MI, float* dw_EOI, const __nv_bfloat16* dy_MO,
                             const __nv_bfloat16* x_MI, const __nv_bfloat16* w_EOI, const int32_t* offsets_E1_device,
                             const int32_t* offsets_E1_host, int E, int I, int O, cudaStream_t stream,
                             bool dw_overwrite = false);
// Same with bf16 weight gradients: dw_e = bf16(dw_e + dy_e^T @ x_e), the sum in fp32, rounded once.
void grouped_matmul_backward(__nv_bfloat16* dx_MI, __nv_bfloat16* dw_EOI, const __nv_bfloat16* dy_MO,
                             const __nv_bfloat16* x_MI, const __nv_bfloat16* w_EOI, const int32_t* offsets_E1_device,
                             const int32_t* offsets_E1_host, int E, int I, int O, cudaStream_t stream,
                             bool dw_overwrite = false);
// dx only (dw = nullptr picks no overload above by itself).
inline void grouped_matmul_backward(__nv_bfloat16* dx_MI, std::nullptr_t, const __nv_bfloat16* dy_MO,
                                    const __nv_bfloat16* x_MI, const __nv_bfloat16* w_EOI,
                                    const int32_t* offsets_E1_device, const int32_t* offsets_E1_host, int E, int I,
                                    int O, cudaStream_t stream) {
  grouped_matmul_backward(dx_MI, static_cast<float*>(nullptr), dy_MO, x_MI, w_EOI, offsets_E1_device,
                          offsets_E1_host, E, I, O, stream);
}

}  // namespace mop::cuda
