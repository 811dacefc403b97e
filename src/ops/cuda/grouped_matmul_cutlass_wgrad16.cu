// The expert weight-gradient GEMMs with bf16 gradient storage (GPU runs with one micro-batch per
// step keep gradients in bf16): dw_e = bf16(dw_e + dy_e^T @ x_e), the sum formed in fp32 in the
// epilogue and rounded once, or, overwriting, dw_e = bf16(dy_e^T @ x_e) without reading dw (the
// first backward after the gradients were zeroed: the same bits without the zeroing and the reads).
// The adding product has the mainloop and tiles of the fp32 one, so its fp32 sums are the same bits;
// the overwriting one runs the pingpong schedule (grouped_matmul_cutlass.cuh), whose sums are each
// one tile's too (no split-K). Their own translation unit so that they compile in parallel with the
// other products.
#include "ops/cuda/grouped_matmul_cutlass.cuh"

namespace mop::cuda::detail {

void cutlass_grouped_wgrad(__nv_bfloat16* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                           const int32_t* offsets_device, const int32_t* offsets_host, const std::vector<int>& experts,
                           int E, int I, int O, bool overwrite, cudaStream_t stream) {
  if (overwrite) grouped_wgrad<Wgrad16Store>(dw, dy, x, offsets_device, offsets_host, experts, E, I, O, stream);
  else grouped_wgrad<Wgrad16>(dw, dy, x, offsets_device, offsets_host, experts, E, I, O, stream);
}

}  // namespace mop::cuda::detail
