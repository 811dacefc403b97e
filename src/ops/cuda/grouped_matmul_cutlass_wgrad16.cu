// The expert weight-gradient GEMM with bf16 gradient storage (GPU runs with one micro-batch per
// step keep gradients in bf16): dw_e = bf16(dw_e + dy_e^T @ x_e), the sum formed in fp32 in the
// epilogue and rounded once. Same mainloop and tiles as the fp32 product, so the fp32 sums are the
// same bits. Its own translation unit so that it compiles in parallel with the other products.
#include "ops/cuda/grouped_matmul_cutlass.cuh"

namespace mop::cuda::detail {

void cutlass_grouped_wgrad(__nv_bfloat16* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                           const int32_t* offsets_device, const int32_t* offsets_host, const std::vector<int>& experts,
                           int E, int I, int O, cudaStream_t stream) {
  grouped_wgrad<Wgrad16>(dw, dy, x, offsets_device, offsets_host, experts, E, I, O, stream);
}

}  // namespace mop::cuda::detail
