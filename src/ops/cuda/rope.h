// QK-norm fused with rotary embedding (RoPE), Hugging Face "rotate_half" layout; mirrors
// mop::cpu::rmsnorm_* (over each head's hd values) followed by mop::cpu::rope_*.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mop::cuda {

// For every token n and head h, with x = in[n, h, :] (hd values):
//   y = x * rstd * w            (skipped when w_hd == nullptr: y = x, no norm)
//   out[i]      = y[i] cos - y[i + hd/2] sin,   out[i + hd/2] = y[i + hd/2] cos + y[i] sin,
// angle = pos[n] * theta^(-2i/hd), i < hd/2, computed in double as in the CPU op.
// row_stride: elements between consecutive tokens of in and out (>= H * hd), so q and k can be
// read from and written back into a fused qkv GEMM output [N, (H + 2 KVH) hd] (pass the pointer
// to the token-0 q or k slice and row_stride = (H + 2 KVH) hd); contiguous data: H * hd.
// rstd_NH [N, H] (fp32) is written when non-null; pass nullptr with w_hd == nullptr.
// in and out may alias (in place); hd must be even.
void qk_norm_rope_forward(__nv_bfloat16* out_NHd, float* rstd_NH, const __nv_bfloat16* in_NHd,
                          const __nv_bfloat16* w_hd, const int32_t* pos_N, int N, int H, int hd, int row_stride,
                          float eps, double theta, cudaStream_t stream);

// Floats of device scratch qk_norm_rope_backward needs: one partial dw row per block.
size_t qk_norm_rope_backward_scratch_floats(int N, int H, int hd);

// Backward of the above: dout is rotated back (by -angle), then the rmsnorm backward runs on
// each (token, head) row with in and rstd_NH from the forward. din is written; dw (fp32, hd) is
// accumulated (+=) deterministically through scratch (per-block partials added in fixed order).
// w_hd == nullptr: RoPE only (dw_hd, rstd_NH and scratch unused, may be nullptr).
// din, dout and in all use row_stride; din and dout may alias.
void qk_norm_rope_backward(__nv_bfloat16* din_NHd, float* dw_hd, const __nv_bfloat16* dout_NHd,
                           const __nv_bfloat16* in_NHd, const __nv_bfloat16* w_hd, const float* rstd_NH,
                           const int32_t* pos_N, int N, int H, int hd, int row_stride, double theta, float* scratch,
                           cudaStream_t stream);
// Same with a bf16 dw (the fp32 sum added to it and rounded once).
void qk_norm_rope_backward(__nv_bfloat16* din_NHd, __nv_bfloat16* dw_hd, const __nv_bfloat16* dout_NHd,
                           const __nv_bfloat16* in_NHd, const __nv_bfloat16* w_hd, const float* rstd_NH,
                           const int32_t* pos_N, int N, int H, int hd, int row_stride, double theta, float* scratch,
                           cudaStream_t stream);
// RoPE only, no dw (dw = nullptr picks no overload above by itself).
inline void qk_norm_rope_backward(__nv_bfloat16* din_NHd, std::nullptr_t, const __nv_bfloat16* dout_NHd,
                                  const __nv_bfloat16* in_NHd, const __nv_bfloat16* w_hd, const float* rstd_NH,
                                  const int32_t* pos_N, int N, int H, int hd, int row_stride, double theta,
                                  float* scratch, cudaStream_t stream) {
  qk_norm_rope_backward(din_NHd, static_cast<float*>(nullptr), dout_NHd, in_NHd, w_hd, rstd_NH, pos_N, N, H, hd,
                        row_stride, theta, scratch, stream);
}

}  // namespace mop::cuda
