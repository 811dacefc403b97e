#include "ops/cpu/grouped_matmul.h"

#include <cstddef>

#include "core/error.h"
#include "ops/cpu/matmul.h"

namespace mop::cpu {

namespace {
void check_offsets(const int32_t* offsets_E1, int E) {
  MOP_CHECK(offsets_E1[0] >= 0, "grouped_matmul: offsets[0] = {} is negative", offsets_E1[0]);
  for (int e = 0; e < E; ++e)
    MOP_CHECK(offsets_E1[e + 1] >= offsets_E1[e], "grouped_matmul: offsets decrease at expert {} ({} > {})", e,
              offsets_E1[e], offsets_E1[e + 1]);
}
}  // namespace

// One GEMM per expert; BLAS threads each one, which beats splitting experts over threads
// when the token counts are as uneven as routing makes them.
template <class T>
void grouped_matmul_forward(T* y_MO, const T* x_MI, const T* w_EOI, const int32_t* offsets_E1, int E, int I, int O) {
  check_offsets(offsets_E1, E);
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_E1[e], rows = offsets_E1[e + 1] - r0;
    if (rows == 0) continue;
    matmul_forward<T>(y_MO + size_t(r0) * O, x_MI + size_t(r0) * I, w_EOI + size_t(e) * O * I, rows, I, O);
  }
}

template <class T>
void grouped_matmul_backward(T* dx_MI, T* dw_EOI, const T* dy_MO, const T* x_MI, const T* w_EOI,
                             const int32_t* offsets_E1, int E, int I, int O) {
  check_offsets(offsets_E1, E);
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_E1[e], rows = offsets_E1[e + 1] - r0;
    if (rows == 0) continue;
    matmul_backward<T>(dx_MI ? dx_MI + size_t(r0) * I : nullptr, dw_EOI ? dw_EOI + size_t(e) * O * I : nullptr,
                       dy_MO + size_t(r0) * O, x_MI + size_t(r0) * I, w_EOI + size_t(e) * O * I, rows, I, O);
  }
}

template void grouped_matmul_forward<float>(float*, const float*, const float*, const int32_t*, int, int, int);
template void grouped_matmul_forward<double>(double*, const double*, const double*, const int32_t*, int, int, int);
template void grouped_matmul_backward<float>(float*, float*, const float*, const float*, const float*, const int32_t*,
                                             int, int, int);
template void grouped_matmul_backward<double>(double*, double*, const double*, const double*, const double*,
                                              const int32_t*, int, int, int);

}  // namespace mop::cpu
