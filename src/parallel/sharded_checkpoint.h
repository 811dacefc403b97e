// Checkpoints of a sharded run: every rank writes its own shard file, rank 0 the index, the
// training state and the config, all into one directory published atomically by rank 0 once
// every rank has written (a shared file system across nodes, as for any multi-node checkpoint):
//   shard-RRRRR-of-WWWWW.safetensors   rank R's parameter and AdamW chunks (parallel/zero.h)
//   shards.json                        world, zero, ep and the shard file names
//   state.json, config.toml            as in a single-rank checkpoint
// load_sharded_checkpoint needs the same layout (world, zero, ep; each shard file also records its
// units and sizes) and reads only this rank's file. read_checkpoint_for_table reads any checkpoint
// (single-rank, or sharded with any layout) whole and keeps the parameters of a given table: that
// is how a run resumes on another layout and how a sharded checkpoint is exported. Resharding to
// another layout is not supported yet.
#pragma once
#include <string>

#include "checkpoint/checkpoint.h"
#include "parallel/process_group.h"
#include "parallel/zero.h"

namespace mop {

struct ShardLayout {
  int world = 1, zero = 0, ep = 1;
  bool operator==(const ShardLayout&) const = default;
};
ShardLayout sharded_checkpoint_layout(const std::string& dir);  // from shards.json

// Collective over world. Saves into run_dir/checkpoints/step_NNNNNNN, updates `latest`, prunes to
// the newest keep. Returns the checkpoint directory (on every rank).
std::string save_sharded_run_checkpoint(const std::string& run_dir, int64_t keep, const Config& cfg,
                                        const ShardLayout& layout, const ShardedState& z, ProcessGroup& world,
                                        const TrainState& st);
// Collective over world. dir: a checkpoint directory (resolve_checkpoint).
void load_sharded_checkpoint(const std::string& dir, const ShardLayout& layout, ShardedState& z, ProcessGroup& world,
                             TrainState* st);
bool is_sharded_checkpoint(const std::string& dir);

// Any checkpoint directory -> the parameters (and, when m / v are non-null, the AdamW moments) of
// the tensors of `table` (the whole model, or one rank's part of it), laid out by `table`; st and
// optimizer_steps when non-null. Memory: the whole model's parameters and moments, once.
void read_checkpoint_for_table(const std::string& dir, const ModelConfig& c, bool decay_embeddings,
                               const ParamTable& table, float* params, float* m, float* v, TrainState* st,
                               int64_t* optimizer_steps);

}  // namespace mop
