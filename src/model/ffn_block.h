// FFN half of a decoder layer: y = x2 + ffn(rmsnorm(x2)), where ffn is a dense SwiGLU (the first
// dense_layers layers) or the MoE: router -> top-k -> dropless permutation by expert -> SwiGLU
// experts (grouped GEMMs) -> weighted combine, plus the shared experts.
#pragma once
#include <cstdint>
#include <vector>

#include "core/alloc.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/params.h"
#include "ops/cpu/router.h"

namespace mop {

template <class T> struct FfnSaved {
  HostArray<T> h2, rstd2;      // (N, D), (N)
  // MoE (M = N K rows in expert order)
  HostArray<T> probs, w;       // (N, E), (N, K)
  HostArray<int32_t> idx, row; // (N, K) expert ids and their rows in the expert-sorted buffer
  std::vector<int32_t> offsets;// (E + 1)
  std::vector<int32_t> counts; // (E) tokens per expert in this micro-batch
  HostArray<T> xp, gu, a, yp;  // (M, D), (M, 2F), (M, F), (M, D); for a dense layer: gu, a only
  HostArray<T> sgu, sa;        // shared experts: (N, 2Fs), (N, Fs)
  double lb_loss = 0;          // load-balancing loss of this layer (unscaled)
};

cpu::RouterConfig router_config(const ModelConfig& c);

template <class T>
void ffn_block_forward(T* y_ND, FfnSaved<T>& s, const T* x2_ND, const LayerView<T>& w, const ModelConfig& c, int layer,
                       int N);
// dx2 = dy + d(branch)/dx2 (written). lb_scale multiplies this layer's load-balancing loss in the
// objective (0 when it is off).
template <class T>
void ffn_block_backward(T* dx2_ND, const T* dy_ND, const FfnSaved<T>& s, const T* x2_ND, const LayerView<T>& w,
                        const LayerView<T>& g, const ModelConfig& c, int layer, int N, T lb_scale);

}  // namespace mop
