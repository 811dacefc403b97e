#include "model/params.h"

#include <cmath>

#include "core/error.h"
#include "core/rng.h"
#include "core/strings.h"

namespace mop {

const ParamSpec* ParamTable::try_find(const std::string& name) const {
  for (const auto& p : params)
    if (p.name == name) return &p;
  return nullptr;
}

const ParamSpec& ParamTable::find(const std::string& name) const {
  if (const ParamSpec* p = try_find(name)) return *p;
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  MOP_FAIL("no parameter named '{}'{}", name, did_you_mean(name, names));
}

ParamTable build_param_table(const ModelConfig& c, bool decay_embeddings, ExpertRange experts) {
  c.validate();
  if (experts.count < 0) experts = {0, int(c.experts)};
  MOP_CHECK(experts.begin >= 0 && experts.count >= 1 && experts.begin + experts.count <= int(c.experts),
            "expert range [{}, {}) is not inside the model's {} experts", experts.begin, experts.begin + experts.count,
            c.experts);
  ParamTable t;
  t.experts = experts;
  const int64_t D = c.hidden, hd = c.hd(), V = c.vocab_size, E = c.experts, F = c.expert_ffn;
  const float std_in = float(c.init_std);
  // Output projections feed the residual stream once per layer per branch: GPT-2's 1/sqrt(2L).
  const float std_out = float(c.init_std / std::sqrt(2.0 * double(c.layers)));
  auto add = [&](std::string name, std::vector<int64_t> shape, ParamRole role, int layer, float std, float value = 0,
                 bool decay = true, int expert = -1, bool trainable = true) {
    ParamSpec p;
    p.name = std::move(name);
    p.shape = std::move(shape);
    p.numel = 1;
    for (int64_t s : p.shape) p.numel *= s;
    p.offset = t.total;
    p.role = role;
    p.layer = layer;
    p.expert = expert;
    p.trainable = trainable;
    p.decay = decay && trainable;
    p.init_std = std;
    p.init_value = value;
    t.total += p.numel;
    t.params.push_back(std::move(p));
  };
  const bool ds = c.family == "deepseek_v3";
  add("model.embed_tokens.weight", {V, D}, ParamRole::embedding, -1, std_in, 0, decay_embeddings);
  for (int l = 0; l < int(c.layers); ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "input_layernorm.weight", {D}, ParamRole::norm, l, 0, 1, false);
    add(p + "self_attn.q_proj.weight", {c.heads * hd, D}, ParamRole::attn_qkv, l, std_in);
    add(p + "self_attn.k_proj.weight", {c.kv_heads * hd, D}, ParamRole::attn_qkv, l, std_in);
    add(p + "self_attn.v_proj.weight", {c.kv_heads * hd, D}, ParamRole::attn_qkv, l, std_in);
    add(p + "self_attn.o_proj.weight", {D, c.heads * hd}, ParamRole::attn_out, l, std_out);
    if (c.qk_norm) {
      add(p + "self_attn.q_norm.weight", {hd}, ParamRole::qk_norm, l, 0, 1, false);
      add(p + "self_attn.k_norm.weight", {hd}, ParamRole::qk_norm, l, 0, 1, false);
    }
    add(p + "post_attention_layernorm.weight", {D}, ParamRole::norm, l, 0, 1, false);
    if (!c.is_moe_layer(l)) {
      const int64_t Fd = c.dense_width();
      add(p + "mlp.gate_proj.weight", {Fd, D}, ParamRole::dense_gate_up, l, std_in);
      add(p + "mlp.up_proj.weight", {Fd, D}, ParamRole::dense_gate_up, l, std_in);
      add(p + "mlp.down_proj.weight", {D, Fd}, ParamRole::dense_down, l, std_out);
      continue;
    }
    add(p + "mlp.gate.weight", {E, D}, ParamRole::router, l, std_in);
    if (c.router == "sigmoid")
      add(p + "mlp.gate.e_score_correction_bias", {E}, ParamRole::router_bias, l, 0, 0, false, -1, false);
    if (c.shared_experts > 0) {
      const int64_t Fs = c.shared_width();
      const std::string s = p + (ds ? "mlp.shared_experts." : "mlp.shared_expert.");
      add(s + "gate_proj.weight", {Fs, D}, ParamRole::shared_gate_up, l, std_in);
      add(s + "up_proj.weight", {Fs, D}, ParamRole::shared_gate_up, l, std_in);
      add(s + "down_proj.weight", {D, Fs}, ParamRole::shared_down, l, std_out);
    }
    // Routed experts last: a layer's dense parameters are one contiguous range and its local experts
    // another, so ZeRO can shard them over different groups (all ranks vs. the expert replicas).
    for (int e = experts.begin; e < experts.begin + experts.count; ++e) {
      add(fmt::format("{}mlp.experts.{}.gate_proj.weight", p, e), {F, D}, ParamRole::expert_gate_up, l, std_in, 0, true, e);
      add(fmt::format("{}mlp.experts.{}.up_proj.weight", p, e), {F, D}, ParamRole::expert_gate_up, l, std_in, 0, true, e);
    }
    for (int e = experts.begin; e < experts.begin + experts.count; ++e)
      add(fmt::format("{}mlp.experts.{}.down_proj.weight", p, e), {D, F}, ParamRole::expert_down, l, std_out, 0, true, e);
  }
  add("model.norm.weight", {D}, ParamRole::norm, -1, 0, 1, false);
  if (!c.tie_embeddings) add("lm_head.weight", {V, D}, ParamRole::head, -1, std_in);
  return t;
}

template <class T> void init_params(const ParamTable& t, T* base, uint64_t seed) {
  // Each tensor has its own random stream, so tensors can be filled in parallel with the same result.
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t i = 0; i < t.params.size(); ++i) {
    const ParamSpec& p = t.params[i];
    T* w = base + p.offset;
    if (p.init_std == 0) {
      for (int64_t j = 0; j < p.numel; ++j) w[j] = T(p.init_value);
      continue;
    }
    Rng rng(hash_seed(seed, p.name));
    for (int64_t j = 0; j < p.numel; ++j) w[j] = T(double(p.init_std) * rng.normal());
  }
}

template void init_params(const ParamTable&, float*, uint64_t);
template void init_params(const ParamTable&, double*, uint64_t);

}  // namespace mop
