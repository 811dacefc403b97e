#include "train/config.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <toml++/toml.h>

#include "core/error.h"
#include "core/strings.h"

namespace mop {

namespace {

void assign(int64_t& dst, const toml::node& n, const std::string& key) {
  auto v = n.value<int64_t>();
  if (!v) {
    auto d = n.value<double>();
    MOP_CHECK(d && *d == double(int64_t(*d)), "config key {}: expected an integer", key);
    v = int64_t(*d);
  }
  dst = *v;
}
void assign(uint64_t& dst, const toml::node& n, const std::string& key) {
  int64_t v = 0;
  assign(v, n, key);
  MOP_CHECK(v >= 0, "config key {}: expected a non-negative integer, got {}", key, v);
  dst = uint64_t(v);
}
void assign(double& dst, const toml::node& n, const std::string& key) {
  auto v = n.value<double>();
  MOP_CHECK(v.has_value(), "config key {}: expected a number", key);
  dst = *v;
}
void assign(bool& dst, const toml::node& n, const std::string& key) {
  auto v = n.value<bool>();
  MOP_CHECK(v.has_value(), "config key {}: expected true or false", key);
  dst = *v;
}
void assign(std::string& dst, const toml::node& n, const std::string& key) {
  if (auto s = n.value<std::string>()) dst = *s;
  else if (auto i = n.value<int64_t>()) dst = std::to_string(*i);
  else MOP_FAIL("config key {}: expected a string", key);
}

std::string literal(int64_t v) { return std::to_string(v); }
std::string literal(uint64_t v) { return std::to_string(v); }
std::string literal(bool v) { return v ? "true" : "false"; }
std::string literal(double v) {
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // stays a TOML float
  return s;
}
std::string literal(const std::string& v) {
  std::string out = "\"";
  for (char ch : v) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out + "\"";
}

struct Field {
  const char* key;
  const char* doc;
  void (*set)(Config&, const toml::node&, const std::string&);
  std::string (*get)(const Config&);
};

#define F(KEY, MEMBER, DOC)                                                                            \
  Field {                                                                                              \
    KEY, DOC, [](Config& c, const toml::node& n, const std::string& k) { assign(c.MEMBER, n, k); },    \
        [](const Config& c) { return literal(c.MEMBER); }                                              \
  }

const std::vector<Field>& fields() {
  static const std::vector<Field> f = {
      F("device", device, "auto | cpu | cuda"),
      F("model.preset", model.preset, "tiny | moe-1b | moe-7b | qwen3-30b-a3b | custom; applied before the other model keys"),
      F("model.family", model.family, "qwen3_moe | deepseek_v3: parameter names and export format"),
      F("model.vocab_size", model.vocab_size, "vocabulary size (the byte tokenizer needs >= 259)"),
      F("model.hidden", model.hidden, "model width D"),
      F("model.layers", model.layers, "decoder layers"),
      F("model.heads", model.heads, "query heads"),
      F("model.kv_heads", model.kv_heads, "key/value heads (GQA); divides heads"),
      F("model.head_dim", model.head_dim, "head dimension; 0 = hidden / heads"),
      F("model.qk_norm", model.qk_norm, "RMSNorm on queries and keys per head (Qwen3, OLMoE)"),
      F("model.rope_theta", model.rope_theta, "RoPE base"),
      F("model.dense_layers", model.dense_layers, "first k layers use a dense FFN (DeepSeek-V3: 3)"),
      F("model.dense_ffn", model.dense_ffn, "dense FFN width; 0 = 4 x expert_ffn"),
      F("model.experts", model.experts, "routed experts per MoE layer"),
      F("model.top_k", model.top_k, "experts per token"),
      F("model.expert_ffn", model.expert_ffn, "routed expert FFN width"),
      F("model.shared_experts", model.shared_experts, "always-on experts (width shared_experts x expert_ffn)"),
      F("model.router", model.router, "softmax | sigmoid (sigmoid uses an aux-loss-free balance bias)"),
      F("model.norm_topk", model.norm_topk, "renormalise the top-k weights to sum to 1"),
      F("model.router_groups", model.router_groups, "group-limited routing: number of expert groups"),
      F("model.router_topk_groups", model.router_topk_groups, "groups each token may use"),
      F("model.routed_scale", model.routed_scale, "scale of the routed experts' combine weights"),
      F("model.bias_update_rate", model.bias_update_rate, "sigmoid router: balance-bias step per optimizer step"),
      F("model.lb_coef", model.lb_coef, "load-balancing loss coefficient (mean over MoE layers)"),
      F("model.tie_embeddings", model.tie_embeddings, "share the input embedding with the LM head"),
      F("model.norm_eps", model.norm_eps, "RMSNorm epsilon"),
      F("model.init_std", model.init_std, "std of the normal init of matrices (output projections / sqrt(2 layers))"),
      F("model.max_seq_len", model.max_seq_len, "max_position_embeddings written on export"),
      F("train.steps", train.steps, "optimizer steps"),
      F("train.seed", train.seed, "seed of init, data order and sampling"),
      F("train.seq_len", train.seq_len, "tokens per sequence"),
      F("train.batch", train.batch, "sequences per micro-batch"),
      F("train.grad_accum", train.grad_accum, "micro-batches per optimizer step"),
      F("train.lr", train.lr, "peak learning rate"),
      F("train.min_lr_ratio", train.min_lr_ratio, "final lr as a fraction of train.lr (cosine, linear)"),
      F("train.warmup", train.warmup, "linear warmup steps"),
      F("train.schedule", train.schedule, "cosine | linear | constant (after warmup)"),
      F("train.weight_decay", train.weight_decay, "AdamW decoupled weight decay (norms never decay)"),
      F("train.decay_embeddings", train.decay_embeddings, "apply weight decay to the input embedding"),
      F("train.beta1", train.beta1, "AdamW beta1"),
      F("train.beta2", train.beta2, "AdamW beta2"),
      F("train.eps", train.eps, "AdamW epsilon"),
      F("train.clip", train.clip, "clip the global gradient norm to this; 0 = off"),
      F("train.checkpointing", train.checkpointing,
        "activation checkpointing: none | full (recompute each layer) | selective (GPU: keep attention and GEMM "
        "outputs, recompute norms, permutation and SwiGLU)"),
      F("train.log_every", train.log_every, "progress line every N steps (metrics.jsonl gets every step)"),
      F("train.eval_every", train.eval_every, "evaluate on the held-out split every N steps; 0 = off"),
      F("train.eval_batches", train.eval_batches, "micro-batches per evaluation"),
      F("train.save_every", train.save_every, "checkpoint every N steps; 0 = only at the end"),
      F("train.keep_checkpoints", train.keep_checkpoints, "newest checkpoints kept in the run directory"),
      F("train.sample_tokens", train.sample_tokens, "bytes generated at the end of the run; 0 = off"),
      F("train.sample_temperature", train.sample_temperature, "sampling temperature; 0 = greedy"),
      F("train.peak_tflops", train.peak_tflops, "MFU denominator in TFLOP/s; 0 = 790 on an H200, an estimate on the CPU"),
      F("train.timing", train.timing,
        "GPU: time each step's phases with CUDA events (forward, head, backward, exchange, update, ...) into "
        "metrics.jsonl's phase_ms and the progress line"),
      F("train.trace", train.trace,
        "GPU: write a Chrome trace (Perfetto) of one step to this file: every kernel, copy and memset per "
        "stream, and the host's CUDA calls; '{rank}' in it becomes the rank (else rank 0 writes); empty = off"),
      F("train.trace_step", train.trace_step, "the step train.trace records; 0 = the last step of the run"),
      F("train.deterministic", train.deterministic,
        "GPU: bit-identical runs from one seed (deterministic attention backward, ~15% slower)"),
      F("train.threads", train.threads, "CPU threads; 0 = all cores up to 8"),
      F("data.path", data.path, "token shards from `mop data prepare` (directory or file); empty = built-in corpus"),
      F("data.val_path", data.val_path, "held-out shards; empty = the val_* shards beside data.path"),
      F("data.builtin_docs", data.builtin_docs, "documents generated for the built-in corpus"),
      F("data.synthetic", data.synthetic, "uniformly random tokens (benchmarks); ignores data.path"),
      F("parallel.zero", parallel.zero, "ZeRO stage: 0 replicate, 1 shard optimizer state, 2 and gradients, 3 and parameters"),
      F("parallel.ep", parallel.ep, "expert-parallel degree; divides the world size and model.experts"),
      F("parallel.world", parallel.world, "expected world size; 0 = whatever the launcher gives (saved resolved)"),
      F("parallel.timeout_s", parallel.timeout_s, "seconds a collective may wait for the other ranks before failing"),
      F("parallel.gpu_comm", parallel.gpu_comm,
        "device collectives: nccl (one GPU per rank), host (staged through Gloo; slow, lets ranks share a GPU) "
        "or skip (they do nothing: to time the step without communication; wrong results)"),
      F("parallel.ep_overlap", parallel.ep_overlap,
        "GPU with parallel.ep > 1: each MoE layer's expert weight gradients run on a second stream beside its "
        "return exchange and the backward after it (same bits)"),
      F("parallel.ep_balance", parallel.ep_balance,
        "GPU with parallel.ep > 1: each MoE layer moves blocks of pairs from the most loaded ranks to the ranks that "
        "routed them, which compute them with the experts' weights lent on a side stream (least-loaded balancing; "
        "same math, other summation order)"),
      F("parallel.ep_balance_min_rows", parallel.ep_balance_min_rows,
        "parallel.ep_balance: the smallest block of (token, expert) pairs, and the smallest lowering of the largest "
        "load, worth moving"),
      F("parallel.ep_balance_max_guests", parallel.ep_balance_max_guests,
        "parallel.ep_balance: experts one rank may compute as a guest per layer (each borrowed expert keeps 3 x hidden "
        "x expert_ffn bf16 weights until the layer's backward)"),
      F("run.name", run.name, "run name; default: the model preset"),
      F("run.dir", run.dir, "where config.toml, metrics.jsonl and checkpoints go; default runs/<name>"),
      F("run.memory_limit_gib", run.memory_limit_gib, "cap on tracked memory in GiB; 0 = none"),
  };
  return f;
}
#undef F

const Field* find_field(const std::string& key) {
  for (const auto& f : fields())
    if (key == f.key) return &f;
  return nullptr;
}

void flatten(const toml::table& t, const std::string& prefix, std::map<std::string, toml::node*>& out,
             std::vector<std::string>& order) {
  for (auto& [k, v] : const_cast<toml::table&>(t)) {
    std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
    if (auto* sub = v.as_table()) {
      flatten(*sub, key, out, order);
    } else {
      if (!out.count(key)) order.push_back(key);
      out[key] = &v;
    }
  }
}

void check_known(const std::string& key, const std::string& origin) {
  if (find_field(key)) return;
  MOP_FAIL("unknown config key '{}' in {}{}", key, origin, did_you_mean(key, config_keys()));
}

}  // namespace

std::vector<std::string> config_keys() {
  std::vector<std::string> k;
  for (const auto& f : fields()) k.push_back(f.key);
  return k;
}

std::string config_reference() {
  Config def;
  std::string s;
  for (const auto& f : fields()) s += fmt::format("{} = {}  # {}\n", f.key, f.get(def), f.doc);
  return s;
}

Overrides parse_overrides(const std::vector<std::string>& sets) {
  Overrides o;
  for (const auto& s : sets) {
    size_t eq = s.find('=');
    MOP_CHECK(eq != std::string::npos && eq > 0, "--set expects key=value, got '{}'", s);
    o.emplace_back(s.substr(0, eq), s.substr(eq + 1));
  }
  return o;
}

Config parse_config_text(const std::string& text, const std::string& origin, const Overrides& overrides) {
  toml::table file;
  try {
    file = toml::parse(text, origin);
  } catch (const toml::parse_error& e) {
    MOP_FAIL("{}: invalid TOML at line {}, column {}: {}", origin, e.source().begin.line, e.source().begin.column,
             e.description());
  }
  std::map<std::string, toml::node*> values;
  std::vector<std::string> order;
  flatten(file, "", values, order);
  for (const auto& k : order) check_known(k, origin);

  // Each override is parsed as a TOML value; a bare word that is not valid TOML is a string.
  std::vector<toml::table> override_tables;
  override_tables.reserve(overrides.size());
  for (const auto& [k, v] : overrides) {
    check_known(k, "--set");
    toml::table t;
    try {
      t = toml::parse("v = " + v);
    } catch (const toml::parse_error&) {
      t = toml::table{};
      t.insert("v", v);
    }
    override_tables.push_back(std::move(t));
    if (!values.count(k)) order.push_back(k);
    values[k] = override_tables.back().get("v");
  }

  Config c;
  if (values.count("model.preset")) {
    std::string preset;
    assign(preset, *values["model.preset"], "model.preset");
    c.model = model_preset(preset);
  }
  for (const auto& k : order) {
    if (k == "model.preset") continue;
    find_field(k)->set(c, *values[k], k);
  }
  if (c.run.name.empty()) c.run.name = c.model.preset;
  c.validate();
  return c;
}

Config load_config(const std::string& file, const Overrides& overrides) {
  if (file.empty()) return parse_config_text("", "defaults", overrides);
  toml::table t;
  FILE* f = std::fopen(file.c_str(), "rb");
  MOP_CHECK(f, "cannot open config file '{}': {}", file, std::strerror(errno));
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  std::fclose(f);
  return parse_config_text(text, file, overrides);
}

void Config::validate() const {
  MOP_CHECK(device == "auto" || device == "cpu" || device == "cuda", "device = '{}' is not one of auto, cpu, cuda",
            device);
  model.validate();
  const TrainConfig& t = train;
  MOP_CHECK(t.steps >= 0, "train.steps must be >= 0, got {}", t.steps);
  MOP_CHECK(t.seq_len > 0, "train.seq_len must be positive, got {}", t.seq_len);
  MOP_CHECK(t.batch > 0, "train.batch must be positive, got {}", t.batch);
  MOP_CHECK(t.grad_accum > 0, "train.grad_accum must be positive, got {}", t.grad_accum);
  MOP_CHECK(t.lr >= 0, "train.lr must be >= 0, got {}", t.lr);
  MOP_CHECK(t.min_lr_ratio >= 0 && t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1], got {}", t.min_lr_ratio);
  MOP_CHECK(t.warmup >= 0, "train.warmup must be >= 0, got {}", t.warmup);
  MOP_CHECK(t.schedule == "cosine" || t.schedule == "linear" || t.schedule == "constant",
            "train.schedule = '{}' is not one of cosine, linear, constant", t.schedule);
  MOP_CHECK(t.beta1 >= 0 && t.beta1 < 1, "train.beta1 must be in [0, 1), got {}", t.beta1);
  MOP_CHECK(t.beta2 >= 0 && t.beta2 < 1, "train.beta2 must be in [0, 1), got {}", t.beta2);
  MOP_CHECK(t.eps > 0, "train.eps must be positive, got {}", t.eps);
  MOP_CHECK(t.weight_decay >= 0, "train.weight_decay must be >= 0, got {}", t.weight_decay);
  MOP_CHECK(t.clip >= 0, "train.clip must be >= 0, got {}", t.clip);
  MOP_CHECK(t.checkpointing == "none" || t.checkpointing == "full" || t.checkpointing == "selective",
            "train.checkpointing = '{}' is not one of none, full, selective", t.checkpointing);
  MOP_CHECK(t.trace_step >= 0 && (t.trace.empty() || t.trace_step <= t.steps),
            "train.trace_step = {} is not a step of the run (1..train.steps = {}, or 0 for the last)", t.trace_step,
            t.steps);
  MOP_CHECK(t.log_every > 0, "train.log_every must be positive, got {}", t.log_every);
  MOP_CHECK(t.eval_every >= 0 && t.save_every >= 0 && t.eval_batches > 0 && t.keep_checkpoints > 0,
            "train.eval_every, train.save_every must be >= 0 and train.eval_batches, train.keep_checkpoints > 0");
  MOP_CHECK(t.sample_tokens >= 0 && t.sample_temperature >= 0, "train.sample_tokens and sample_temperature must be >= 0");
  MOP_CHECK(t.peak_tflops >= 0 && t.threads >= 0, "train.peak_tflops and train.threads must be >= 0");
  MOP_CHECK(data.builtin_docs >= 2, "data.builtin_docs must be >= 2, got {}", data.builtin_docs);
  MOP_CHECK(parallel.zero >= 0 && parallel.zero <= 3, "parallel.zero = {}: must be 0, 1, 2 or 3", parallel.zero);
  MOP_CHECK(parallel.ep >= 1 && model.experts % parallel.ep == 0,
            "parallel.ep = {} must be >= 1 and divide model.experts = {}", parallel.ep, model.experts);
  MOP_CHECK(parallel.world >= 0 && parallel.timeout_s > 0, "parallel.world must be >= 0 and parallel.timeout_s > 0");
  MOP_CHECK(parallel.ep_balance_min_rows >= 0, "parallel.ep_balance_min_rows must not be negative, got {}",
            parallel.ep_balance_min_rows);
  MOP_CHECK(parallel.ep_balance_max_guests >= 1 && parallel.ep_balance_max_guests <= model.experts,
            "parallel.ep_balance_max_guests must be between 1 and model.experts = {}, got {}", model.experts,
            parallel.ep_balance_max_guests);
  MOP_CHECK(parallel.gpu_comm == "nccl" || parallel.gpu_comm == "host" || parallel.gpu_comm == "skip",
            "parallel.gpu_comm must be 'nccl', 'host' or 'skip', got '{}'", parallel.gpu_comm);
  MOP_CHECK(run.memory_limit_gib >= 0, "run.memory_limit_gib must be >= 0, got {}", run.memory_limit_gib);
}

std::string Config::run_dir() const {
  if (!run.dir.empty()) return run.dir;
  return "runs/" + (run.name.empty() ? model.preset : run.name);
}

std::string Config::to_toml() const {
  std::string out = "# mop run configuration (resolved: every key, defaults included)\n";
  std::string section;
  for (const auto& f : fields()) {
    std::string key = f.key;
    size_t dot = key.find('.');
    std::string sec = dot == std::string::npos ? "" : key.substr(0, dot);
    std::string leaf = dot == std::string::npos ? key : key.substr(dot + 1);
    if (sec != section) {
      out += fmt::format("\n[{}]\n", sec);
      section = sec;
    }
    out += fmt::format("{} = {}  # {}\n", leaf, f.get(*this), f.doc);
  }
  return out;
}

}  // namespace mop
