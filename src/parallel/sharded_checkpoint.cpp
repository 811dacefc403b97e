#include "parallel/sharded_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <cstring>
#include <map>
#include <optional>

#include "checkpoint/atomic_dir.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace mop {

namespace {

std::string shard_name(int rank, int world) { return fmt::format("shard-{:05}-of-{:05}.safetensors", rank, world); }

// Rank 0 picks the temporary directory; the others learn its path.
std::string broadcast_string(ProcessGroup& g, std::string s) {
  int64_t n = int64_t(s.size());
  g.broadcast(&n, 1, 0);
  std::vector<int32_t> chars(static_cast<size_t>(n));
  if (g.rank() == 0)
    for (size_t i = 0; i < s.size(); ++i) chars[i] = int32_t(static_cast<unsigned char>(s[i]));
  g.broadcast(chars.data(), chars.size(), 0);
  s.resize(size_t(n));
  for (size_t i = 0; i < chars.size(); ++i) s[i] = char(chars[i]);
  return s;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  f.close();
  MOP_CHECK(f.good(), "cannot write {}", path);
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MOP_CHECK(f.good(), "cannot open {}", path);
  try {
    return nlohmann::json::parse(std::string(std::istreambuf_iterator<char>(f), {}));
  } catch (const nlohmann::json::exception& e) {
    MOP_FAIL("{}: not valid JSON: {}", path, e.what());
  }
}

}  // namespace

bool is_sharded_checkpoint(const std::string& dir) { return fs::exists(fs::path(dir) / kShardIndex); }

ShardLayout sharded_checkpoint_layout(const std::string& dir) {
  const std::string index = (fs::path(dir) / kShardIndex).string();
  const nlohmann::json idx = read_json(index);
  ShardLayout l{idx.value("world", -1), idx.value("zero", -1), idx.value("ep", -1)};
  MOP_CHECK(l.world >= 1 && l.ep >= 1 && l.world % l.ep == 0 && l.zero >= 0 && l.zero <= 3,
            "{}: bad layout world {} zero {} ep {}", index, l.world, l.zero, l.ep);
  return l;
}

namespace {

// Rebuilds the whole model from a sharded checkpoint: for every expert-parallel block's table,
// each unit's chunks come from the ranks of the group it was sharded over (all ranks for dense
// units; ranks q, q + ep, ... for expert block q), in group-rank order.
void read_sharded_whole(const std::string& dir, const ModelConfig& c, bool decay_embeddings, const ParamTable& whole,
                        float* params, float* m, float* v) {
  const ShardLayout l = sharded_checkpoint_layout(dir);
  MOP_CHECK(c.experts % l.ep == 0, "{}: ep {} does not divide the model's {} experts", dir, l.ep, c.experts);
  std::map<int, ckpt::SafetensorsFile> files;
  auto file = [&](int r) -> const ckpt::SafetensorsFile& {
    auto it = files.find(r);
    if (it == files.end()) it = files.emplace(r, ckpt::SafetensorsFile((fs::path(dir) / shard_name(r, l.world)).string())).first;
    return it->second;
  };
  std::map<std::string, int64_t> offset;  // name -> offset in `whole`
  for (const auto& p : whole.params) offset[p.name] = p.offset;
  const int El = int(c.experts / l.ep);
  for (int q = 0; q < l.ep; ++q) {
    const ParamTable block = build_param_table(c, decay_embeddings, ExpertRange{q * El, El});
    for (const ZeroUnitSpec& u : zero_units(block)) {
      if (!u.experts && q > 0) continue;  // dense units are the same in every block
      const int G = u.experts ? l.world / l.ep : l.world;
      const int64_t chunk = (u.numel + G - 1) / G;
      std::vector<float> up(size_t(u.numel)), um(size_t(u.numel)), uv(size_t(u.numel));
      for (int k = 0; k < G; ++k) {
        const int rank = u.experts ? q + k * l.ep : k;
        const int64_t b = std::min(u.numel, k * chunk), n = std::min(u.numel, b + chunk) - b;
        const ckpt::SafetensorsFile& f = file(rank);
        f.read_into(u.name + ".param", DType::f32, {n}, up.data() + b);
        f.read_into(u.name + ".exp_avg", DType::f32, {n}, um.data() + b);
        f.read_into(u.name + ".exp_avg_sq", DType::f32, {n}, uv.data() + b);
      }
      for (const ParamSpec& p : u.sub.params) {
        const auto it = offset.find(p.name);
        MOP_CHECK(it != offset.end(), "{}: tensor {} is not in the model", dir, p.name);
        const size_t bytes = sizeof(float) * size_t(p.numel);
        std::memcpy(params + it->second, up.data() + p.offset, bytes);
        if (m) std::memcpy(m + it->second, um.data() + p.offset, bytes);
        if (v) std::memcpy(v + it->second, uv.data() + p.offset, bytes);
      }
    }
  }
}

}  // namespace

void read_checkpoint_for_table(const std::string& dir, const ModelConfig& c, bool decay_embeddings,
                               const ParamTable& table, float* params, float* m, float* v, TrainState* st,
                               int64_t* optimizer_steps) {
  const ParamTable whole = build_param_table(c, decay_embeddings);
  HostArray<float> wp(size_t(whole.total), Mem::workspace);
  HostArray<float> wm(m ? size_t(whole.total) : 0, Mem::workspace), wv(v ? size_t(whole.total) : 0, Mem::workspace);
  int64_t steps = 0;
  if (is_sharded_checkpoint(dir)) {
    read_sharded_whole(dir, c, decay_embeddings, whole, wp.data(), m ? wm.data() : nullptr, v ? wv.data() : nullptr);
    if (st || optimizer_steps) read_train_state((fs::path(dir) / "state.json").string(), st, &steps);
  } else if (m || v || st) {
    AdamW opt(whole, OptimizerSettings{});
    load_checkpoint(dir, whole, wp.data(), &opt, st);
    steps = opt.steps_taken();
    if (m) std::memcpy(wm.data(), opt.m(), sizeof(float) * size_t(whole.total));
    if (v) std::memcpy(wv.data(), opt.v(), sizeof(float) * size_t(whole.total));
  } else {
    load_checkpoint(dir, whole, wp.data(), nullptr, nullptr);
  }
  if (optimizer_steps) *optimizer_steps = steps;
  for (const auto& p : table.params) {
    const ParamSpec& w = whole.find(p.name);
    const size_t bytes = sizeof(float) * size_t(p.numel);
    std::memcpy(params + p.offset, wp.data() + w.offset, bytes);
    if (m) std::memcpy(m + p.offset, wm.data() + w.offset, bytes);
    if (v) std::memcpy(v + p.offset, wv.data() + w.offset, bytes);
  }
}

std::string save_sharded_run_checkpoint(const std::string& run_dir, int64_t keep, const Config& cfg,
                                        const ShardLayout& layout, const ShardedState& z, ProcessGroup& world,
                                        const TrainState& st) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  const std::string name = fmt::format("step_{:07}", st.step);
  std::optional<ckpt::AtomicDir> out;
  std::string tmp;
  if (world.rank() == 0) {
    fs::create_directories(root);
    out.emplace((root / name).string());
    tmp = out->temp_path();
  }
  tmp = broadcast_string(world, tmp);
  z.save_shard((fs::path(tmp) / shard_name(world.rank(), world.size())).string());
  world.barrier();  // every shard is written before rank 0 publishes the directory
  if (world.rank() == 0) {
    nlohmann::json idx;
    idx["world"] = layout.world;
    idx["zero"] = layout.zero;
    idx["ep"] = layout.ep;
    for (int r = 0; r < world.size(); ++r) idx["shards"].push_back(shard_name(r, world.size()));
    write_text(out->path(kShardIndex), idx.dump(2) + "\n");
    write_text(out->path("state.json"), train_state_json(st, z.steps_taken()).dump(2) + "\n");
    write_text(out->path("config.toml"), cfg.to_toml());
    out->commit();
    ckpt::write_text_file_atomic((root / "latest").string(), name + "\n");
    prune_run_checkpoints(root.string(), keep, name);
  }
  world.barrier();  // nobody reads or rewrites the run directory before it is published
  return (root / name).string();
}

void load_sharded_checkpoint(const std::string& dir, const ShardLayout& layout, ShardedState& z, ProcessGroup& world,
                             TrainState* st) {
  const std::string index = (fs::path(dir) / kShardIndex).string();
  const nlohmann::json idx = read_json(index);
  const int w = idx.value("world", -1), zs = idx.value("zero", -1), ep = idx.value("ep", -1);
  MOP_CHECK(w == layout.world && zs == layout.zero && ep == layout.ep,
            "{}: saved by world {} with zero {} and ep {}; this run is world {} with zero {} and ep {} "
            "(resharding is not supported yet)",
            index, w, zs, ep, layout.world, layout.zero, layout.ep);
  z.load_shard((fs::path(dir) / shard_name(world.rank(), world.size())).string());
  int64_t opt_steps = 0;
  read_train_state((fs::path(dir) / "state.json").string(), st, &opt_steps);
  z.set_steps_taken(opt_steps);
}

}  // namespace mop
