#pragma once
#include <cstdint>

namespace mop::cpu {

// Dropless dispatch layout, computed once per layer and shared by permute, combine and their
// backwards (as DeepEP's layout handle). Assignment (n, k) goes to row row_NK[n*K + k] of the
// expert-sorted buffer of M = N*K rows; expert e owns rows [offsets_E1[e], offsets_E1[e+1]), and
// within an expert rows follow token order (a stable counting sort).
void moe_route_layout(int32_t* row_NK, int32_t* offsets_E1, const int32_t* idx_NK, int N, int E, int K);

// xp[row_NK[n,k]] = x[n].
template <class T> void moe_permute(T* xp_MD, const T* x_ND, const int32_t* row_NK, int N, int K, int D);
// dx[n] = sum_k dxp[row_NK[n,k]] (written).
template <class T> void moe_permute_backward(T* dx_ND, const T* dxp_MD, const int32_t* row_NK, int N, int K, int D);
// y[n] = sum_k w[n,k] * yp[row_NK[n,k]] (written).
template <class T>
void moe_combine(T* y_ND, const T* yp_MD, const T* w_NK, const int32_t* row_NK, int N, int K, int D);
// dyp[row] = w[n,k] * dy[n]; dw[n,k] = dy[n] . yp[row] (both written).
template <class T>
void moe_combine_backward(T* dyp_MD, T* dw_NK, const T* dy_ND, const T* yp_MD, const T* w_NK, const int32_t* row_NK,
                          int N, int K, int D);

}  // namespace mop::cpu
