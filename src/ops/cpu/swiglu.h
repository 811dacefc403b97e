#pragma once

namespace mop::cpu {

// h = silu(g) * u where each row of gu_N2F is [g (F) | u (F)] (gate and up as one GEMM emits them).
template <class T> void swiglu_forward(T* h_NF, const T* gu_N2F, int N, int F);
// dgu written.
template <class T> void swiglu_backward(T* dgu_N2F, const T* dh_NF, const T* gu_N2F, int N, int F);

}  // namespace mop::cpu
