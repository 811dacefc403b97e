#pragma once

namespace mop::cpu {

// y = x * rstd * w with rstd = 1 / sqrt(mean_d(x^2) + eps); rstd_N saved for backward.
// Also the QK-norm: N = tokens x heads rows of D = head_dim.
template <class T> void rmsnorm_forward(T* y_ND, T* rstd_N, const T* x_ND, const T* w_D, int N, int D, T eps);
// dx written, dw accumulated.
template <class T>
void rmsnorm_backward(T* dx_ND, T* dw_D, const T* dy_ND, const T* x_ND, const T* w_D, const T* rstd_N, int N, int D);

}  // namespace mop::cpu
