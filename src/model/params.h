// The one size table: every parameter (and non-trained buffer) of a model with its Hugging Face
// name, shape and offset in one flat array. The allocator, the optimizer, checkpoints, export
// and (later) the planner and ZeRO sharding all walk this table, so their sizes agree.
//
// Layout choices that the kernels rely on (names stay Hugging Face's):
// - q_proj, k_proj, v_proj are adjacent, so rows [q; k; v] form one (H + 2 KVH) hd x D matrix
//   and one GEMM projects all three.
// - an expert's gate_proj and up_proj are adjacent (one 2F x D matrix, gate rows first), and
//   all experts' [gate; up] blocks are contiguous (E, 2F, D), followed by all down_proj (E, D, F).
//   The dense and shared FFNs use the same [gate; up] then down order.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "model/config.h"

namespace mop {

enum class ParamRole : uint8_t {
  embedding, norm, attn_qkv, attn_out, qk_norm, router, router_bias, expert_gate_up, expert_down,
  dense_gate_up, dense_down, shared_gate_up, shared_down, head
};

struct ParamSpec {
  std::string name;            // Hugging Face name, e.g. model.layers.0.mlp.experts.3.down_proj.weight
  std::vector<int64_t> shape;  // row-major
  int64_t offset = 0;          // in elements, into the flat parameter array
  int64_t numel = 0;
  ParamRole role;
  int layer = -1;              // -1 for embedding, final norm and head
  int expert = -1;             // routed expert index, -1 otherwise
  bool trainable = true;       // false: a buffer (the sigmoid router's balance bias)
  bool decay = true;           // AdamW weight decay applies (off for norms, biases and embeddings)
  float init_std = 0;          // 0: constant init_value
  float init_value = 0;
};

// The routed experts a table holds: all of them, or the block [begin, begin + count) that one
// expert-parallel rank owns (names keep the global expert index).
struct ExpertRange {
  int begin = 0, count = -1;  // count -1: all experts
};

struct ParamTable {
  std::vector<ParamSpec> params;
  ExpertRange experts;  // resolved (count >= 1)
  int64_t total = 0;  // elements
  const ParamSpec& find(const std::string& name) const;  // throws, suggesting the nearest name
  const ParamSpec* try_find(const std::string& name) const;
};

// decay_embeddings: apply weight decay to the input embedding too (default off).
ParamTable build_param_table(const ModelConfig& c, bool decay_embeddings = false, ExpertRange experts = {});

// Pointers into one flat array (parameters or their gradients share offsets) for one layer.
template <class T> struct LayerView {
  T* ln1 = nullptr;        // (D)
  T* wqkv = nullptr;       // ((H + 2 KVH) hd, D)
  T* q_norm = nullptr;     // (hd) or null
  T* k_norm = nullptr;     // (hd) or null
  T* wo = nullptr;         // (D, H hd)
  T* ln2 = nullptr;        // (D)
  T* router = nullptr;     // (E, D), MoE layers
  T* router_bias = nullptr;// (E), sigmoid router only
  T* w_gu = nullptr;       // (E, 2F, D) experts, or (2Fd, D) dense FFN
  T* w_down = nullptr;     // (E, D, F) experts, or (D, Fd) dense FFN
  T* shared_gu = nullptr;  // (2Fs, D) or null
  T* shared_down = nullptr;// (D, Fs) or null
};
template <class T> struct ModelView {
  T* embed = nullptr;       // (V, D)
  T* final_norm = nullptr;  // (D)
  T* head = nullptr;        // (V, D): the embedding itself when tied
  std::vector<LayerView<T>> layers;
};
// Sets the non-null pointers of src in dst: one unit's view of a layer (parallel/zero.h's units
// split a layer into its dense part and its experts) joins the others'.
template <class T> void merge_layer_view(LayerView<T>& dst, const LayerView<T>& src) {
  for (auto [d, s] : {std::pair{&dst.ln1, src.ln1}, {&dst.wqkv, src.wqkv}, {&dst.q_norm, src.q_norm},
                      {&dst.k_norm, src.k_norm}, {&dst.wo, src.wo}, {&dst.ln2, src.ln2}, {&dst.router, src.router},
                      {&dst.router_bias, src.router_bias}, {&dst.w_gu, src.w_gu}, {&dst.w_down, src.w_down},
                      {&dst.shared_gu, src.shared_gu}, {&dst.shared_down, src.shared_down}})
    if (s) *d = s;
}
// Defined here (not in params.cpp) so any element type works: float, double, bf16.
template <class T> ModelView<T> make_view(const ParamTable& t, const ModelConfig& c, T* base) {
  ModelView<T> v;
  v.layers.resize(size_t(c.layers));
  for (const auto& p : t.params) {
    T* ptr = base + p.offset;
    if (p.layer < 0) {
      if (p.role == ParamRole::embedding) v.embed = ptr;
      else if (p.role == ParamRole::norm) v.final_norm = ptr;
      else if (p.role == ParamRole::head) v.head = ptr;
      continue;
    }
    LayerView<T>& L = v.layers[size_t(p.layer)];
    auto first = [&](T*& slot) {
      if (!slot) slot = ptr;  // the first of an adjacent group starts the fused matrix
    };
    switch (p.role) {
      case ParamRole::norm: (L.ln1 ? L.ln2 : L.ln1) = ptr; break;
      case ParamRole::attn_qkv: first(L.wqkv); break;
      case ParamRole::attn_out: L.wo = ptr; break;
      case ParamRole::qk_norm: (L.q_norm ? L.k_norm : L.q_norm) = ptr; break;
      case ParamRole::router: L.router = ptr; break;
      case ParamRole::router_bias: L.router_bias = ptr; break;
      case ParamRole::expert_gate_up: case ParamRole::dense_gate_up: first(L.w_gu); break;
      case ParamRole::expert_down: case ParamRole::dense_down: first(L.w_down); break;
      case ParamRole::shared_gate_up: first(L.shared_gu); break;
      case ParamRole::shared_down: L.shared_down = ptr; break;
      default: MOP_ASSERT(false);
    }
  }
  if (c.tie_embeddings) v.head = v.embed;
  return v;
}


// Seeded, layout-independent init: each parameter draws from its own stream hash(seed, name).
template <class T> void init_params(const ParamTable& t, T* base, uint64_t seed);

}  // namespace mop
