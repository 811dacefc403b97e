#include "parallel/sharded_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <optional>

#include "checkpoint/atomic_dir.h"
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

std::string save_sharded_run_checkpoint(const std::string& run_dir, int64_t keep, const Config& cfg,
                                        const ShardLayout& layout, const ZeroParams& z, ProcessGroup& world,
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
  z.save((fs::path(tmp) / shard_name(world.rank(), world.size())).string());
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

void load_sharded_checkpoint(const std::string& dir, const ShardLayout& layout, ZeroParams& z, ProcessGroup& world,
                             TrainState* st) {
  const std::string index = (fs::path(dir) / kShardIndex).string();
  const nlohmann::json idx = read_json(index);
  const int w = idx.value("world", -1), zs = idx.value("zero", -1), ep = idx.value("ep", -1);
  MOP_CHECK(w == layout.world && zs == layout.zero && ep == layout.ep,
            "{}: saved by world {} with zero {} and ep {}; this run is world {} with zero {} and ep {} "
            "(resharding is not supported yet)",
            index, w, zs, ep, layout.world, layout.zero, layout.ep);
  z.load((fs::path(dir) / shard_name(world.rank(), world.size())).string());
  int64_t opt_steps = 0;
  read_train_state((fs::path(dir) / "state.json").string(), st, &opt_steps);
  z.set_steps_taken(opt_steps);
}

}  // namespace mop
