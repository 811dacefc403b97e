// Vector access to bf16 rows for the memory-bound kernels: W = 8 moves one 16-byte vector
// (8 bf16) per step and needs 16-byte-aligned pointers; W = 1 is the scalar fallback (the only
// two widths).
#pragma once
#include <cuda_bf16.h>

namespace mop::cuda {

template <int W> static __device__ __forceinline__ void load_f32(const __nv_bfloat16* p, float* f) {
  if constexpr (W == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(h[i]);
      f[2 * i] = t.x, f[2 * i + 1] = t.y;
    }
  } else {
    f[0] = __bfloat162float(*p);
  }
}
template <int W> static __device__ __forceinline__ void store_bf16(__nv_bfloat16* p, const float* f) {
  if constexpr (W == 8) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
    p[0] = __float2bfloat16_rn(f[0]);
  }
}

// The same as a value: W floats of one vector, for kernels that pass them around.
template <int W> struct F32Vec {
  float v[W];
};
template <int W> static __device__ __forceinline__ F32Vec<W> load_vec(const __nv_bfloat16* p) {
  F32Vec<W> out;
  load_f32<W>(p, out.v);
  return out;
}
template <int W> static __device__ __forceinline__ void store_vec(__nv_bfloat16* p, const F32Vec<W>& x) {
  store_bf16<W>(p, x.v);
}

}  // namespace mop::cuda
