#include "model/config.h"

#include "core/error.h"
#include "core/strings.h"

namespace mop {

std::vector<std::string> model_preset_names() { return {"tiny", "moe-1b", "moe-7b", "qwen3-30b-a3b", "custom"}; }

ModelConfig model_preset(const std::string& name) {
  ModelConfig c;  // defaults are the tiny preset
  c.preset = name;
  // "custom": the built-in defaults, for models described key by key (imports, resolved configs).
  if (name == "tiny" || name == "custom") return c;
  c.rope_theta = 1e6;
  c.norm_eps = 1e-6;
  if (name == "moe-1b") {
    c.layers = 12, c.hidden = 1024, c.heads = 16, c.kv_heads = 4, c.head_dim = 64;
    c.experts = 32, c.top_k = 4, c.expert_ffn = 512, c.vocab_size = 32000;
  } else if (name == "moe-7b") {
    c.layers = 16, c.hidden = 2048, c.heads = 16, c.kv_heads = 4, c.head_dim = 128;
    c.experts = 64, c.top_k = 8, c.expert_ffn = 768, c.vocab_size = 151936;
  } else if (name == "qwen3-30b-a3b") {
    c.layers = 48, c.hidden = 2048, c.heads = 32, c.kv_heads = 4, c.head_dim = 128;
    c.experts = 128, c.top_k = 8, c.expert_ffn = 768, c.vocab_size = 151936;
    c.max_seq_len = 40960;
  } else {
    MOP_FAIL("unknown model preset '{}'{}; presets: tiny, moe-1b, moe-7b, qwen3-30b-a3b, custom", name,
             did_you_mean(name, model_preset_names()));
  }
  return c;
}

void ModelConfig::validate() const {
  auto positive = [](const char* key, int64_t v) { MOP_CHECK(v > 0, "model.{} must be positive, got {}", key, v); };
  positive("vocab_size", vocab_size);
  positive("hidden", hidden);
  positive("layers", layers);
  positive("heads", heads);
  positive("kv_heads", kv_heads);
  positive("experts", experts);
  positive("top_k", top_k);
  positive("expert_ffn", expert_ffn);
  MOP_CHECK(family == "qwen3_moe" || family == "deepseek_v3",
            "model.family = '{}' is not one of qwen3_moe, deepseek_v3", family);
  MOP_CHECK(head_dim > 0 || hidden % heads == 0,
            "model.heads = {} does not divide model.hidden = {} (set model.head_dim explicitly)", heads, hidden);
  MOP_CHECK(head_dim >= 0, "model.head_dim must be >= 0, got {}", head_dim);
  MOP_CHECK(hd() % 2 == 0, "RoPE needs an even head dimension, got {}", hd());
  MOP_CHECK(heads % kv_heads == 0, "model.kv_heads = {} does not divide model.heads = {}", kv_heads, heads);
  MOP_CHECK(top_k <= experts, "model.top_k = {} exceeds model.experts = {}", top_k, experts);
  MOP_CHECK(dense_layers >= 0 && dense_layers <= layers, "model.dense_layers = {} must be in [0, layers = {}]",
            dense_layers, layers);
  MOP_CHECK(shared_experts >= 0, "model.shared_experts must be >= 0, got {}", shared_experts);
  MOP_CHECK(router == "softmax" || router == "sigmoid", "model.router = '{}' is not one of softmax, sigmoid", router);
  MOP_CHECK(router_groups >= 1 && experts % router_groups == 0,
            "model.router_groups = {} does not divide model.experts = {}", router_groups, experts);
  MOP_CHECK(router_topk_groups >= 1 && router_topk_groups <= router_groups,
            "model.router_topk_groups = {} must be in [1, router_groups = {}]", router_topk_groups, router_groups);
  MOP_CHECK(router_topk_groups * (experts / router_groups) >= top_k,
            "group-limited routing keeps {} groups x {} experts = {} experts, fewer than top_k = {}", router_topk_groups,
            experts / router_groups, router_topk_groups * (experts / router_groups), top_k);
  MOP_CHECK(rope_theta > 0, "model.rope_theta must be positive, got {}", rope_theta);
  MOP_CHECK(norm_eps > 0, "model.norm_eps must be positive, got {}", norm_eps);
  MOP_CHECK(init_std > 0, "model.init_std must be positive, got {}", init_std);
  MOP_CHECK(lb_coef >= 0, "model.lb_coef must be >= 0, got {}", lb_coef);
}

ModelCounts model_counts(const ModelConfig& c) {
  const int64_t D = c.hidden, hd = c.hd();
  const int64_t attn = D * (c.heads + 2 * c.kv_heads) * hd + c.heads * hd * D;
  const int64_t norms = 2 * D + (c.qk_norm ? 2 * hd : 0);
  const int64_t expert = 3 * D * c.expert_ffn;
  const int64_t shared = 3 * D * c.shared_width();
  const int64_t router = c.experts * D;
  const int64_t dense = 3 * D * c.dense_width();
  ModelCounts n;
  n.embedding = c.vocab_size * D;
  const int64_t head = c.vocab_size * D;
  n.total = n.embedding + (c.tie_embeddings ? 0 : head) + D;
  n.active_matmul = head;
  for (int64_t l = 0; l < c.layers; ++l) {
    n.total += attn + norms;
    n.active_matmul += attn;
    if (c.is_moe_layer(l)) {
      n.total += c.experts * expert + shared + router + (c.router == "sigmoid" ? c.experts : 0);
      n.active_matmul += c.top_k * expert + shared + router;
    } else {
      n.total += dense;
      n.active_matmul += dense;
    }
  }
  return n;
}

double model_flops_per_token(const ModelConfig& c, int64_t seq_len) {
  return 6.0 * double(model_counts(c).active_matmul) + 6.0 * double(c.layers * c.heads * c.hd()) * double(seq_len);
}

}  // namespace mop
