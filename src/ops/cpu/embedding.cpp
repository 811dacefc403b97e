#include "ops/cpu/embedding.h"

#include <algorithm>

#include "core/error.h"

namespace mop::cpu {

namespace {
// Validated up front: an exception must not escape an OpenMP region.
void check_tokens(const int32_t* tokens_N, int N, int V) {
  for (int n = 0; n < N; ++n)
    MOP_CHECK(tokens_N[n] >= 0 && tokens_N[n] < V, "embedding: token id {} at index {} out of range [0, {})",
              tokens_N[n], n, V);
}
}  // namespace

template <class T> void embedding_forward(T* out_ND, const int32_t* tokens_N, const T* wte_VD, int N, int D, int V) {
  check_tokens(tokens_N, N, V);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) std::copy_n(wte_VD + size_t(tokens_N[n]) * D, D, out_ND + size_t(n) * D);
}

template <class T> void embedding_backward(T* dwte_VD, const T* dout_ND, const int32_t* tokens_N, int N, int D, int V) {
  check_tokens(tokens_N, N, V);
  // Repeated tokens hit the same dwte row, so threads own column blocks instead of tokens:
  // every element is summed over n in token order whatever the thread count.
  constexpr int kBlock = 64;
  const int n_blocks = (D + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int b = 0; b < n_blocks; ++b) {
    const int d0 = b * kBlock, d1 = std::min(D, d0 + kBlock);
    for (int n = 0; n < N; ++n) {
      T* dst = dwte_VD + size_t(tokens_N[n]) * D;
      const T* src = dout_ND + size_t(n) * D;
      for (int d = d0; d < d1; ++d) dst[d] += src[d];
    }
  }
}

template void embedding_forward<float>(float*, const int32_t*, const float*, int, int, int);
template void embedding_forward<double>(double*, const int32_t*, const double*, int, int, int);
template void embedding_backward<float>(float*, const float*, const int32_t*, int, int, int);
template void embedding_backward<double>(double*, const double*, const int32_t*, int, int, int);

}  // namespace mop::cpu
