// Checkpoints of a sharded run: every rank writes its own shard file, rank 0 the index, the
// training state and the config, all into one directory published atomically by rank 0 once
// every rank has written (a shared file system across nodes, as for any multi-node checkpoint):
//   shard-RRRRR-of-WWWWW.safetensors   rank R's parameter and AdamW chunks (parallel/zero.h)
//   shards.json                        world, zero, ep and the shard file names
//   state.json, config.toml            as in a single-rank checkpoint
// Loading requires the same layout (world, zero, ep; each shard file also records its units and
// sizes); a mismatch names both. Resharding to
// another layout is not supported yet.
#pragma once
#include <string>

#include "checkpoint/checkpoint.h"
#include "parallel/process_group.h"
#include "parallel/zero.h"

namespace mop {

struct ShardLayout {
  int world = 1, zero = 0, ep = 1;
};

// Collective over world. Saves into run_dir/checkpoints/step_NNNNNNN, updates `latest`, prunes to
// the newest keep. Returns the checkpoint directory (on every rank).
std::string save_sharded_run_checkpoint(const std::string& run_dir, int64_t keep, const Config& cfg,
                                        const ShardLayout& layout, const ZeroParams& z, ProcessGroup& world,
                                        const TrainState& st);
// Collective over world. dir: a checkpoint directory (resolve_checkpoint).
void load_sharded_checkpoint(const std::string& dir, const ShardLayout& layout, ZeroParams& z, ProcessGroup& world,
                             TrainState* st);
bool is_sharded_checkpoint(const std::string& dir);

}  // namespace mop
