#pragma once
#include <cstdint>

namespace mop::cpu {

// Expert GEMMs over an expert-sorted buffer: rows [offsets[e], offsets[e+1]) belong to expert e,
// y_MO[rows_e] = x_MI[rows_e] @ w_EOI[e]^T. Experts with no rows are skipped. M = offsets[E].
template <class T>
void grouped_matmul_forward(T* y_MO, const T* x_MI, const T* w_EOI, const int32_t* offsets_E1, int E, int I, int O);
// dx written (skipped when null), dw accumulated.
template <class T>
void grouped_matmul_backward(T* dx_MI, T* dw_EOI, const T* dy_MO, const T* x_MI, const T* w_EOI,
                             const int32_t* offsets_E1, int E, int I, int O);

}  // namespace mop::cpu
