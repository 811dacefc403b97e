// The MoE decoder on the CPU backend: explicit forward and backward, no autograd tape.
// Each layer's forward returns its output and a Saved struct; backward consumes it. With
// activation checkpointing (Recompute::full) only the layer input is kept (category
// "checkpoints") and the layer's forward reruns inside backward: same ops, same order, so the
// gradients are bit-identical to the run without recomputation.
#pragma once
#include <cstdint>
#include <vector>

#include "model/attention_block.h"
#include "model/batch.h"
#include "model/ffn_block.h"
#include "model/params.h"

namespace mop {

enum class Recompute { none, full };

struct LossStats {
  double ce_sum = 0;             // sum of token cross-entropies (nats)
  int64_t ce_tokens = 0;         // tokens with a target
  double lb_sum = 0;             // sum over MoE layers of the load-balancing loss
  std::vector<int64_t> counts;   // (layers, experts): tokens routed to each expert
  void add(const LossStats& o);
};

template <class T> class Decoder {
 public:
  Decoder(const ModelConfig& c, const ParamTable& t);
  // Parameters and gradients are flat arrays laid out by the ParamTable; grads may be null
  // for inference.
  void bind(const T* params, T* grads);

  // Forward and backward of one micro-batch; gradients accumulate into grads for the objective
  //   ce_scale * sum_tokens CE + lb_scale * sum_moe_layers LB.
  LossStats forward_backward(const TokenBatch& b, T ce_scale, T lb_scale, Recompute r);
  // Forward only (evaluation).
  LossStats forward_loss(const TokenBatch& b);
  // Logits (V) of the token at position `row` of the batch (sampling).
  void logits_at(const TokenBatch& b, int row, T* logits_V);

  int head_chunk_rows = 256;  // rows of logits alive at once in the fused head + loss

 private:
  struct LayerSaved {
    AttnSaved<T> attn;
    HostArray<T> x2;  // (N, D) residual stream between attention and FFN
    FfnSaved<T> ffn;
  };
  void layer_forward(int l, const T* x_in, T* x_out, LayerSaved& s, const TokenBatch& b);
  // Final norm + LM head + cross-entropy, a chunk of rows at a time so the N x V logits never
  // exist whole. With dhf non-null the gradients of hf and of the head are produced in the same pass.
  double head_loss(const T* hf_ND, const TokenBatch& b, T* dhf_ND, T ce_scale, int64_t* tokens);

  ModelConfig c_;
  const ParamTable& table_;
  ModelView<T> w_, g_;
};

}  // namespace mop
