// Row-major GEMMs mapped onto cuBLAS's column-major convention: a row-major R x C matrix is the
// column-major C x R matrix with the same leading dimension, so each product is computed transposed
// (Y^T = W X^T etc.) with the operands swapped and no data moved.
#include "ops/cuda/blas.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/matmul.h"

namespace mop::cuda {
namespace {

void check_shapes(const char* op, int N, int I, int O) {
  MOP_CHECK(N >= 0 && I > 0 && O > 0, "{}: bad shape N={} I={} O={}", op, N, I, O);
}

// y^T (O x N, col-major, ld O) = op(w) (O x I) * x^T (I x N): w is the col-major I x O matrix (ld I)
// transposed; x^T is x's storage read column-major (ld I).
void forward(void* y, cudaDataType_t y_type, const __nv_bfloat16* x, const __nv_bfloat16* w, int N, int I, int O,
             cudaStream_t stream) {
  LtGemm g;
  g.transa = true;
  g.transb = false;
  g.m = O, g.n = N, g.k = I;
  g.lda = I, g.ldb = I, g.ldc = O;
  g.a_type = CUDA_R_16BF, g.b_type = CUDA_R_16BF, g.c_type = y_type;
  blas_handle().gemm(g, w, x, y, 0.f, stream);
}

void backward(__nv_bfloat16* dx_NI, void* dw_OI, cudaDataType_t dw_type, const __nv_bfloat16* dy_NO,
              const __nv_bfloat16* x_NI, const __nv_bfloat16* w_OI, int N, int I, int O, cudaStream_t stream) {
  check_shapes("matmul_backward", N, I, O);
  if (N == 0) return;
  BlasHandle& h = blas_handle();
  if (dx_NI) {
    // dx^T (I x N, ld I) = w^T (I x O: w's storage, ld I) * dy^T (O x N: dy's storage, ld O).
    LtGemm g;
    g.transa = false, g.transb = false;
    g.m = I, g.n = N, g.k = O;
    g.lda = I, g.ldb = O, g.ldc = I;
    g.a_type = CUDA_R_16BF, g.b_type = CUDA_R_16BF, g.c_type = CUDA_R_16BF;
    h.gemm(g, w_OI, dy_NO, dx_NI, 0.f, stream);
  }
  if (dw_OI) {
    // dw^T (I x O, ld I) += x^T (I x N: x's storage, ld I) * dy (N x O: dy's storage O x N, transposed).
    LtGemm g;
    g.transa = false, g.transb = true;
    g.m = I, g.n = O, g.k = N;
    g.lda = I, g.ldb = O, g.ldc = I;
    g.a_type = CUDA_R_16BF, g.b_type = CUDA_R_16BF, g.c_type = dw_type;
    h.gemm(g, x_NI, dy_NO, dw_OI, 1.f, stream);
  }
}

}  // namespace

void matmul_forward(__nv_bfloat16* y_NO, const __nv_bfloat16* x_NI, const __nv_bfloat16* w_OI, int N, int I, int O,
                    cudaStream_t stream) {
  check_shapes("matmul_forward", N, I, O);
  if (N == 0) return;
  forward(y_NO, CUDA_R_16BF, x_NI, w_OI, N, I, O, stream);
}

void matmul_forward_f32out(float* y_NO, const __nv_bfloat16* x_NI, const __nv_bfloat16* w_OI, int N, int I, int O,
                           cudaStream_t stream) {
  check_shapes("matmul_forward_f32out", N, I, O);
  if (N == 0) return;
  forward(y_NO, CUDA_R_32F, x_NI, w_OI, N, I, O, stream);
}

void matmul_backward(__nv_bfloat16* dx_NI, float* dw_OI, const __nv_bfloat16* dy_NO, const __nv_bfloat16* x_NI,
                     const __nv_bfloat16* w_OI, int N, int I, int O, cudaStream_t stream) {
  backward(dx_NI, dw_OI, CUDA_R_32F, dy_NO, x_NI, w_OI, N, I, O, stream);
}

void matmul_backward(__nv_bfloat16* dx_NI, __nv_bfloat16* dw_OI, const __nv_bfloat16* dy_NO,
                     const __nv_bfloat16* x_NI, const __nv_bfloat16* w_OI, int N, int I, int O, cudaStream_t stream) {
  backward(dx_NI, dw_OI, CUDA_R_16BF, dy_NO, x_NI, w_OI, N, I, O, stream);
}

}  // namespace mop::cuda
