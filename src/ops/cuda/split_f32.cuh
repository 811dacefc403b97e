// fp32 master weights stored as two 16-bit halves, so the bf16 compute copy IS the upper half and no
// separate fp32 array is kept (4 bytes per parameter instead of 4 + 2):
//   hi = the bf16 nearest to p (ties toward zero magnitude), lo = the low 16 bits of p.
// Exact for every finite p: hi differs from p's upper 16 bits t by at most one, rounding up
// happens exactly when lo > 0x8000, so t = lo > 0x8000 ? hi - 1 : hi and p = t << 16 | lo.
// hi is round-to-nearest like __float2bfloat16_rn; the two differ only on exact ties with an odd
// t (the same half-ulp error, other direction). A NaN p becomes a quiet NaN in hi (lo = 0), so a
// diverged weight stays visible to the forward pass.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace mop::cuda {

static __device__ __forceinline__ void split_f32(float p, uint16_t& hi, uint16_t& lo) {
  const uint32_t bits = __float_as_uint(p);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    hi = uint16_t(0x7fc0u | ((bits >> 16) & 0x8000u)), lo = 0;
    return;
  }
  lo = uint16_t(bits & 0xffffu);
  hi = uint16_t((bits >> 16) + (lo > 0x8000u ? 1u : 0u));
}

static __device__ __forceinline__ float merge_f32(uint16_t hi, uint16_t lo) {
  const uint32_t t = lo > 0x8000u ? uint32_t(uint16_t(hi - 1u)) : uint32_t(hi);
  return __uint_as_float(t << 16 | lo);
}

}  // namespace mop::cuda
