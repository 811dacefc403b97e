#include "checkpoint/hf.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "checkpoint/atomic_dir.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "data/tokenizer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace mop {

namespace {
void check_exportable(const ModelConfig& c) {
  MOP_CHECK(c.family == "qwen3_moe",
            "export: family '{}' has no Hugging Face equivalent here (DeepSeek-V3 needs multi-head latent attention); "
            "only qwen3_moe exports",
            c.family);
  MOP_CHECK(c.qk_norm, "export: Qwen3-MoE always has QK-norm; this model has model.qk_norm = false");
  MOP_CHECK(c.router == "softmax", "export: Qwen3-MoE routes with softmax; this model has model.router = '{}'",
            c.router);
  MOP_CHECK(c.shared_experts == 0, "export: Qwen3-MoE has no shared experts; this model has {}", c.shared_experts);
  MOP_CHECK(c.router_groups == 1 && c.routed_scale == 1.0,
            "export: Qwen3-MoE has no group-limited routing or routed scale (router_groups = {}, routed_scale = {})",
            c.router_groups, c.routed_scale);
}

json read_json(const std::string& path) {
  std::ifstream f(path);
  MOP_CHECK(f.good(), "cannot open {}", path);
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    MOP_FAIL("{}: not valid JSON: {}", path, e.what());
  }
}
}  // namespace

std::string hf_config_json(const ModelConfig& c) {
  check_exportable(c);
  json j;
  j["architectures"] = {"Qwen3MoeForCausalLM"};
  j["model_type"] = "qwen3_moe";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden;
  j["intermediate_size"] = c.dense_width();
  j["moe_intermediate_size"] = c.expert_ffn;
  j["num_hidden_layers"] = c.layers;
  j["num_attention_heads"] = c.heads;
  j["num_key_value_heads"] = c.kv_heads;
  j["head_dim"] = c.hd();
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.max_seq_len;
  j["rms_norm_eps"] = c.norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["rope_scaling"] = nullptr;
  j["num_experts"] = c.experts;
  j["num_experts_per_tok"] = c.top_k;
  j["norm_topk_prob"] = c.norm_topk;
  j["decoder_sparse_step"] = 1;
  json mlp_only = json::array();
  for (int64_t l = 0; l < c.dense_layers; ++l) mlp_only.push_back(l);
  j["mlp_only_layers"] = mlp_only;
  j["router_aux_loss_coef"] = c.lb_coef;
  j["output_router_logits"] = false;
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["use_sliding_window"] = false;
  j["sliding_window"] = nullptr;
  j["initializer_range"] = c.init_std;
  j["use_cache"] = true;
  j["torch_dtype"] = "float32";
  if (c.vocab_size >= data::kByteVocab) {
    j["bos_token_id"] = data::kBos;
    j["eos_token_id"] = data::kEos;
    j["pad_token_id"] = data::kPad;
  }
  return j.dump(2) + "\n";
}

void hf_export(const std::string& out_dir, const ModelConfig& c, const ParamTable& t, const float* params) {
  const std::string config = hf_config_json(c);
  ckpt::AtomicDir out(out_dir);
  ckpt::SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (const auto& p : t.params) w.add(p.name, DType::f32, p.shape, params + p.offset);
  w.write(out.path("model.safetensors"));
  std::ofstream f(out.path("config.json"));
  f << config;
  f.close();
  MOP_CHECK(f.good(), "cannot write {}", out.path("config.json"));
  out.commit();
}

ModelConfig hf_read_config(const std::string& hf_dir) {
  const std::string path = (fs::path(hf_dir) / "config.json").string();
  json j = read_json(path);
  const std::string type = j.value("model_type", "");
  MOP_CHECK(type == "qwen3_moe", "{}: model_type '{}' is not supported for import (supported: qwen3_moe)", path, type);
  auto get = [&](const char* key) -> const json& {
    MOP_CHECK(j.contains(key), "{}: missing key '{}'", path, key);
    return j.at(key);
  };
  ModelConfig c;
  c.preset = "custom";
  c.family = "qwen3_moe";
  c.vocab_size = get("vocab_size").get<int64_t>();
  c.hidden = get("hidden_size").get<int64_t>();
  c.layers = get("num_hidden_layers").get<int64_t>();
  c.heads = get("num_attention_heads").get<int64_t>();
  c.kv_heads = j.value("num_key_value_heads", c.heads);
  c.head_dim = j.value("head_dim", c.hidden / c.heads);
  c.qk_norm = true;
  c.rope_theta = j.value("rope_theta", 1e6);
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object())
    c.rope_theta = j["rope_parameters"].value("rope_theta", c.rope_theta);
  c.norm_eps = j.value("rms_norm_eps", 1e-6);
  c.experts = get("num_experts").get<int64_t>();
  c.top_k = get("num_experts_per_tok").get<int64_t>();
  c.expert_ffn = get("moe_intermediate_size").get<int64_t>();
  c.norm_topk = j.value("norm_topk_prob", false);
  c.lb_coef = j.value("router_aux_loss_coef", 0.001);
  c.tie_embeddings = j.value("tie_word_embeddings", false);
  c.max_seq_len = j.value("max_position_embeddings", int64_t(4096));
  c.init_std = j.value("initializer_range", 0.02);
  MOP_CHECK(j.value("decoder_sparse_step", 1) == 1, "{}: decoder_sparse_step != 1 is not supported", path);
  // mlp_only_layers must be a prefix 0..k-1 (the layout this engine models as dense_layers).
  std::vector<int64_t> dense = j.value("mlp_only_layers", std::vector<int64_t>{});
  for (size_t i = 0; i < dense.size(); ++i)
    MOP_CHECK(dense[i] == int64_t(i), "{}: mlp_only_layers must be the first k layers, got layer {} at position {}",
              path, dense[i], i);
  c.dense_layers = int64_t(dense.size());
  c.dense_ffn = j.value("intermediate_size", int64_t(0));
  c.validate();
  return c;
}

void hf_load_weights(const std::string& hf_dir, const ParamTable& t, float* params) {
  fs::path dir(hf_dir);
  std::map<std::string, std::string> file_of;  // tensor -> file
  std::vector<std::string> files;
  if (fs::exists(dir / "model.safetensors.index.json")) {
    json idx = read_json((dir / "model.safetensors.index.json").string());
    for (auto& [name, file] : idx.at("weight_map").items()) {
      file_of[name] = file.get<std::string>();
      if (std::find(files.begin(), files.end(), file_of[name]) == files.end()) files.push_back(file_of[name]);
    }
  } else {
    files.push_back("model.safetensors");
  }
  std::map<std::string, std::unique_ptr<ckpt::SafetensorsFile>> open;
  for (const auto& f : files) open[f] = std::make_unique<ckpt::SafetensorsFile>((dir / f).string());
  for (const auto& p : t.params) {
    const std::string f = file_of.count(p.name) ? file_of[p.name] : files.front();
    open[f]->read_as_f32(p.name, p.shape, params + p.offset);
  }
}

}  // namespace mop
