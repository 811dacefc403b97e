#pragma once
#include <cstdint>

namespace mop::cpu {

// Rotary embedding in the Hugging Face "rotate_half" layout: within each head the pair
// (i, i + hd/2), i < hd/2, is rotated by angle pos[n] * theta^(-2i/hd):
//   out[i] = x[i] cos - x[i+hd/2] sin,  out[i+hd/2] = x[i+hd/2] cos + x[i] sin.
// Angles are computed in double. in and out may alias.
template <class T> void rope_forward(T* out_NHd, const T* in_NHd, const int32_t* pos_N, int N, int H, int hd, double theta);
// The transpose (rotation by -angle). din and dout may alias.
template <class T> void rope_backward(T* din_NHd, const T* dout_NHd, const int32_t* pos_N, int N, int H, int hd, double theta);

}  // namespace mop::cpu
