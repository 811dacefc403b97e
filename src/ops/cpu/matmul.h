#pragma once

namespace mop::cpu {

// y_NO = x_NI @ w_OI^T (weights in PyTorch Linear layout: out x in).
template <class T> void matmul_forward(T* y_NO, const T* x_NI, const T* w_OI, int N, int I, int O);
// dx_NI = dy_NO @ w_OI (written; skipped when dx is null); dw_OI += dy_NO^T @ x_NI (skipped when dw is null).
template <class T>
void matmul_backward(T* dx_NI, T* dw_OI, const T* dy_NO, const T* x_NI, const T* w_OI, int N, int I, int O);

}  // namespace mop::cpu
