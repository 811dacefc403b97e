// Hugging Face interchange: a directory with config.json + model.safetensors (or sharded
// model-0000N-of-0000M.safetensors with model.safetensors.index.json) that transformers
// loads as Qwen3MoeForCausalLM.
#pragma once
#include <string>

#include "model/params.h"
#include "train/config.h"

namespace mop {

// config.json for the model; throws when the model has no Hugging Face equivalent
// (e.g. shared experts or a sigmoid router in the qwen3_moe family).
std::string hf_config_json(const ModelConfig& c);
void hf_export(const std::string& out_dir, const ModelConfig& c, const ParamTable& t, const float* params);
// Reads config.json into a ModelConfig (qwen3_moe only, for now).
ModelConfig hf_read_config(const std::string& hf_dir);
// Loads the weights of hf_dir into params (laid out by t); bf16/f16 are widened to fp32.
void hf_load_weights(const std::string& hf_dir, const ParamTable& t, float* params);

}  // namespace mop
