// What a sharded checkpoint (parallel/sharded_checkpoint.h) holds for one rank: its shard of the
// parameter units and their AdamW moments (parallel/zero.h's units and chunks), one safetensors
// file. Implemented by the CPU backend's ZeroParams and by the GPU decoder, which write the same
// files for the same layout.
#pragma once
#include <cstdint>
#include <string>

namespace mop {

class ShardedState {
 public:
  virtual ~ShardedState() = default;
  // Writes / reads this rank's shard file; load checks the layout and names the file on a mismatch.
  virtual void save_shard(const std::string& path) const = 0;
  virtual void load_shard(const std::string& path) = 0;
  virtual int64_t steps_taken() const = 0;
  virtual void set_steps_taken(int64_t s) = 0;
};

}  // namespace mop
