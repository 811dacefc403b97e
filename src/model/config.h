// The MoE decoder's shape. One struct covers Qwen3-MoE, Mixtral/OLMoE and the DeepSeek-V3
// family without MLA; presets from DESIGN.md fill it, config keys `model.*` override fields.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mop {

struct ModelConfig {
  std::string preset = "tiny";
  std::string family = "qwen3_moe";  // qwen3_moe | deepseek_v3: parameter names and export format
  int64_t vocab_size = 259;
  int64_t hidden = 64;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t kv_heads = 2;
  int64_t head_dim = 16;          // 0: hidden / heads
  bool qk_norm = true;
  double rope_theta = 1e6;
  int64_t dense_layers = 0;       // the first k layers use a dense SwiGLU FFN instead of experts
  int64_t dense_ffn = 0;          // their FFN width (0: 4 * expert_ffn)
  int64_t experts = 8;
  int64_t top_k = 2;
  int64_t expert_ffn = 32;
  int64_t shared_experts = 0;     // always-on experts, run as one dense SwiGLU of width shared_experts * expert_ffn
  std::string router = "softmax"; // softmax | sigmoid (with aux-loss-free balance bias)
  bool norm_topk = true;          // renormalise the top-k weights to sum to 1
  int64_t router_groups = 1;      // group-limited routing: experts split in this many groups
  int64_t router_topk_groups = 1; // groups a token may route to
  double routed_scale = 1.0;      // multiplies the routed experts' combine weights
  double bias_update_rate = 1e-3; // sigmoid router: balance-bias step per optimizer step
  double lb_coef = 0.01;          // load-balancing loss coefficient (mean over MoE layers)
  bool tie_embeddings = false;
  double norm_eps = 1e-6;
  double init_std = 0.02;
  int64_t max_seq_len = 4096;     // written to exported configs (RoPE needs no table)

  int64_t hd() const { return head_dim ? head_dim : hidden / heads; }
  int64_t dense_width() const { return dense_ffn ? dense_ffn : 4 * expert_ffn; }
  int64_t shared_width() const { return shared_experts * expert_ffn; }
  bool is_moe_layer(int64_t l) const { return l >= dense_layers; }
  int64_t moe_layers() const { return layers - dense_layers; }
  // Throws mop::Error naming the offending values.
  void validate() const;
};

// Presets of DESIGN.md: tiny, moe-1b, moe-7b, qwen3-30b-a3b. Throws on an unknown name
// (suggesting the nearest).
ModelConfig model_preset(const std::string& name);
std::vector<std::string> model_preset_names();

struct ModelCounts {
  int64_t total = 0;          // every parameter
  int64_t embedding = 0;      // input embedding table
  int64_t active_matmul = 0;  // matmul weights one token touches (head included, embedding excluded)
};
ModelCounts model_counts(const ModelConfig& c);

// Model FLOPs per token as DESIGN.md defines MFU: 6 x active matmul params + 6 x layers x heads x
// head_dim x T (causal attention forward and backward). Recomputation is not counted.
double model_flops_per_token(const ModelConfig& c, int64_t seq_len);

}  // namespace mop
