// Attention half of a decoder layer: x2 = x + o_proj(attention(rope(qk_norm(qkv_proj(rmsnorm(x)))))).
#pragma once
#include "core/alloc.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/params.h"

namespace mop {

template <class T> struct AttnSaved {
  HostArray<T> h1;           // (N, D) normed input
  HostArray<T> rstd1;        // (N)
  HostArray<T> q_raw, k_raw; // (N, H, hd), (N, KVH, hd) before QK-norm
  HostArray<T> rstd_q, rstd_k; // (N H), (N KVH)
  HostArray<T> q, k, v;      // after QK-norm and RoPE: (N, H, hd), (N, KVH, hd), (N, KVH, hd)
  HostArray<T> att;          // (N, H, hd)
  HostArray<T> lse;          // (N, H)
};

// x2_ND = x_ND + attention branch.
template <class T>
void attention_block_forward(T* x2_ND, AttnSaved<T>& s, const T* x_ND, const LayerView<T>& w, const ModelConfig& c,
                             const TokenBatch& b);
// dx_ND = dx2_ND + d(branch)/dx (written); weight gradients accumulated into g.
template <class T>
void attention_block_backward(T* dx_ND, const T* dx2_ND, const AttnSaved<T>& s, const T* x_ND, const LayerView<T>& w,
                              const LayerView<T>& g, const ModelConfig& c, const TokenBatch& b);

}  // namespace mop
