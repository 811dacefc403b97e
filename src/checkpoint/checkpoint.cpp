#include "checkpoint/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/atomic_dir.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace mop {

namespace {
constexpr int kFormatVersion = 1;

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MOP_CHECK(f.good(), "cannot open {}", path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  f.close();
  MOP_CHECK(f.good(), "cannot write {}", path);
}
}  // namespace

nlohmann::json train_state_json(const TrainState& st, int64_t optimizer_steps) {
  nlohmann::json j;
  j["format_version"] = kFormatVersion;
  j["step"] = st.step;
  j["optimizer_steps"] = optimizer_steps;
  j["rng_state"] = std::to_string(st.rng_state);  // as a string: JSON numbers lose 64-bit precision
  j["data_cursor"] = st.cursor;
  j["tokens_seen"] = st.tokens_seen;
  j["elapsed_s"] = st.elapsed_s;
  return j;
}

nlohmann::json read_train_state(const std::string& state_path, TrainState* st, int64_t* optimizer_steps) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text(state_path));
  } catch (const nlohmann::json::exception& e) {
    MOP_FAIL("{}: not valid JSON: {}", state_path, e.what());
  }
  MOP_CHECK(j.value("format_version", 0) == kFormatVersion, "{}: format_version {} (this build reads {})",
            state_path, j.value("format_version", 0), kFormatVersion);
  MOP_CHECK(j.contains("step"), "{}: no training state (a weights-only checkpoint cannot be resumed)", state_path);
  try {
    if (st) {
      st->step = j.at("step").get<int64_t>();
      st->rng_state = std::stoull(j.at("rng_state").get<std::string>());
      st->cursor = j.at("data_cursor").get<data::Cursor>();
      st->tokens_seen = j.value("tokens_seen", int64_t(0));
      st->elapsed_s = j.value("elapsed_s", 0.0);
    }
    if (optimizer_steps) *optimizer_steps = j.value("optimizer_steps", int64_t(0));
  } catch (const nlohmann::json::exception& e) {
    MOP_FAIL("{}: bad training state: {}", state_path, e.what());
  }
  return j;
}

std::vector<std::string> prune_run_checkpoints(const std::string& root, int64_t keep, const std::string& newest) {
  std::vector<std::string> all, removed;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0 &&
        e.path().filename().string().find('.') == std::string::npos)
      all.push_back(e.path().filename().string());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + size_t(keep) < all.size(); ++i)
    if (all[i] != newest) {
      fs::remove_all(fs::path(root) / all[i]);
      removed.push_back(all[i]);
    }
  return removed;
}

void save_checkpoint(const std::string& dir, const Config& cfg, const ParamTable& t, const float* params,
                     const AdamW* opt, const TrainState* st) {
  ckpt::AtomicDir out(dir);
  {
    ckpt::SafetensorsWriter w;
    w.set_metadata("format", "pt");
    for (const auto& p : t.params) w.add(p.name, DType::f32, p.shape, params + p.offset);
    w.write(out.path("model.safetensors"));
  }
  if (opt) {
    ckpt::SafetensorsWriter w;
    for (const auto& p : t.params) {
      if (!p.trainable) continue;
      w.add("exp_avg." + p.name, DType::f32, p.shape, opt->m() + p.offset);
      w.add("exp_avg_sq." + p.name, DType::f32, p.shape, opt->v() + p.offset);
    }
    w.write(out.path("optimizer.safetensors"));
  }
  nlohmann::json j = st ? train_state_json(*st, opt ? opt->steps_taken() : 0) : nlohmann::json::object();
  j["format_version"] = kFormatVersion;
  j["params_total"] = t.total;
  write_text(out.path("state.json"), j.dump(2) + "\n");
  write_text(out.path("config.toml"), cfg.to_toml());
  out.commit();
}

bool checkpoint_has_state(const std::string& dir) {
  return fs::exists(fs::path(dir) / "optimizer.safetensors");
}

std::string resolve_checkpoint(const std::string& path) {
  fs::path p(path);
  MOP_CHECK(fs::is_directory(p), "checkpoint path '{}' is not a directory", path);
  auto is_checkpoint = [](const fs::path& d) {
    return fs::exists(d / "model.safetensors") || fs::exists(d / kShardIndex);
  };
  if (is_checkpoint(p)) return p.string();
  fs::path latest = p / "checkpoints" / "latest";
  MOP_CHECK(fs::exists(latest),
            "'{}' is neither a checkpoint (no model.safetensors or {}) nor a run directory (no {})", path, kShardIndex,
            latest.string());
  std::string name = read_text(latest.string());
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  fs::path ck = p / "checkpoints" / name;
  MOP_CHECK(is_checkpoint(ck), "{} names '{}', which has no model.safetensors or {}", latest.string(), name,
            kShardIndex);
  return ck.string();
}

Config checkpoint_config(const std::string& dir, const Overrides& overrides) {
  return load_config((fs::path(dir) / "config.toml").string(), overrides);
}

void load_checkpoint(const std::string& dir, const ParamTable& t, float* params, AdamW* opt, TrainState* st) {
  ckpt::SafetensorsFile model((fs::path(dir) / "model.safetensors").string());
  for (const auto& p : t.params) model.read_as_f32(p.name, p.shape, params + p.offset);
  if (!opt && !st) return;

  const std::string state_path = (fs::path(dir) / "state.json").string();
  int64_t opt_steps = 0;
  const nlohmann::json j = read_train_state(state_path, st, &opt_steps);
  MOP_CHECK(j.value("params_total", int64_t(-1)) == t.total, "{}: checkpoint holds {} parameters, the model has {}",
            state_path, j.value("params_total", int64_t(-1)), t.total);
  if (opt) {
    ckpt::SafetensorsFile o((fs::path(dir) / "optimizer.safetensors").string());
    for (const auto& p : t.params) {
      if (!p.trainable) continue;
      o.read_into("exp_avg." + p.name, DType::f32, p.shape, opt->m() + p.offset);
      o.read_into("exp_avg_sq." + p.name, DType::f32, p.shape, opt->v() + p.offset);
    }
    opt->set_steps_taken(opt_steps);
  }
}

std::string save_run_checkpoint(const std::string& run_dir, int64_t keep, const Config& cfg, const ParamTable& t,
                                const float* params, const AdamW& opt, const TrainState& st) {
  fs::path root = fs::path(run_dir) / "checkpoints";
  fs::create_directories(root);
  std::string name = fmt::format("step_{:07}", st.step);
  save_checkpoint((root / name).string(), cfg, t, params, &opt, &st);
  ckpt::write_text_file_atomic((root / "latest").string(), name + "\n");
  prune_run_checkpoints(root.string(), keep, name);
  return (root / name).string();
}

}  // namespace mop
