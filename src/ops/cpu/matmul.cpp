#include "ops/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>

namespace mop::cpu {

namespace {
// Row-major C = alpha op(A) op(B) + beta C. Leading dimensions are clamped to 1 because
// BLAS rejects 0 even when the matrix is empty.
template <class T>
void gemm(bool ta, bool tb, int M, int Nc, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
          int ldc) {
  const auto opa = ta ? CblasTrans : CblasNoTrans, opb = tb ? CblasTrans : CblasNoTrans;
  lda = std::max(lda, 1), ldb = std::max(ldb, 1), ldc = std::max(ldc, 1);
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, opa, opb, M, Nc, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    cblas_dgemm(CblasRowMajor, opa, opb, M, Nc, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
}  // namespace

template <class T> void matmul_forward(T* y_NO, const T* x_NI, const T* w_OI, int N, int I, int O) {
  if (N == 0 || O == 0) return;
  if (I == 0) {  // empty reduction: BLAS may leave C untouched with K == 0
    std::fill_n(y_NO, size_t(N) * O, T(0));
    return;
  }
  gemm<T>(false, true, N, O, I, T(1), x_NI, I, w_OI, I, T(0), y_NO, O);
}

template <class T>
void matmul_backward(T* dx_NI, T* dw_OI, const T* dy_NO, const T* x_NI, const T* w_OI, int N, int I, int O) {
  if (dx_NI && N > 0 && I > 0) {
    if (O == 0)
      std::fill_n(dx_NI, size_t(N) * I, T(0));
    else
      gemm<T>(false, false, N, I, O, T(1), dy_NO, O, w_OI, I, T(0), dx_NI, I);
  }
  if (dw_OI && N > 0 && O > 0 && I > 0) gemm<T>(true, false, O, I, N, T(1), dy_NO, O, x_NI, I, T(1), dw_OI, I);
}

template void matmul_forward<float>(float*, const float*, const float*, int, int, int);
template void matmul_forward<double>(double*, const double*, const double*, int, int, int);
template void matmul_backward<float>(float*, float*, const float*, const float*, const float*, int, int, int);
template void matmul_backward<double>(double*, double*, const double*, const double*, const double*, int, int, int);

}  // namespace mop::cpu
