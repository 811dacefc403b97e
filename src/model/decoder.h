// The MoE decoder on the CPU backend: explicit forward and backward, no autograd tape.
// Each layer's forward returns its output and a Saved struct; backward consumes it. With
// activation checkpointing (Recompute::full) only the layer input is kept (category
// "checkpoints") and the layer's forward reruns inside backward: same ops, same order, so the
// gradients are bit-identical to the run without recomputation.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/attention_block.h"
#include "model/batch.h"
#include "model/ffn_block.h"
#include "model/params.h"

namespace mop {

enum class Recompute { none, full };

// Where the decoder's weights and gradient slots live while it runs. The plain source (bind) is
// one flat array of each; a ZeRO-3 source gathers a layer's weights just before the layer runs,
// frees them after, and reduces the layer's gradients as soon as its backward is complete. The
// decoder calls acquire/release in program order, the same on every rank, so a source may run
// collectives inside them.
template <class T> class ParamSource {
 public:
  virtual ~ParamSource() = default;
  // Embedding, final norm and head (and their gradient slots when backward) stay valid until
  // release_outer.
  virtual void acquire_outer(bool backward, ModelView<T>& w, ModelView<T>& g) = 0;
  virtual void release_outer(bool backward) = 0;
  virtual void acquire_layer(int l, bool backward, LayerView<T>& w, LayerView<T>& g) = 0;
  // backward: layer l's gradients of this micro-batch are complete.
  virtual void release_layer(int l, bool backward) = 0;
};

// One flat array of parameters and one of gradients (grads may be null), laid out by the table.
template <class T> class FlatParams final : public ParamSource<T> {
 public:
  FlatParams(const ParamTable& t, const ModelConfig& c, const T* params, T* grads);
  void acquire_outer(bool, ModelView<T>& w, ModelView<T>& g) override;
  void release_outer(bool) override {}
  void acquire_layer(int l, bool, LayerView<T>& w, LayerView<T>& g) override;
  void release_layer(int, bool) override {}

 private:
  ModelView<T> w_, g_;
};

struct LossStats {
  double ce_sum = 0;             // sum of token cross-entropies (nats)
  int64_t ce_tokens = 0;         // tokens with a target
  double lb_sum = 0;             // sum over MoE layers of the load-balancing loss
  std::vector<int64_t> counts;   // (layers, experts): tokens routed to each expert
  EpLoad ep_load;                // expert parallelism (GPU; CPU with parallel.ep_balance); 0 when not reported
  void add(const LossStats& o);
};

template <class T> class Decoder {
 public:
  Decoder(const ModelConfig& c, const ParamTable& t);
  // Parameters and gradients are flat arrays laid out by the ParamTable; grads may be null
  // for inference.
  void bind(const T* params, T* grads);
  // Or any other source (sharded runs); it must outlive its use.
  void bind(ParamSource<T>* source);
  // Multi-rank MoE layers: expert-parallel dispatch and global load-balancing statistics.
  void set_moe_comm(const MoeComm& comm) { comm_ = comm; }

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
  std::unique_ptr<FlatParams<T>> flat_;
  ParamSource<T>* src_ = nullptr;
  ModelView<T> w_, g_;  // filled by the source between acquire and release
  MoeComm comm_;
};

}  // namespace mop
