// Training checkpoints. A checkpoint is a directory, written atomically (temporary directory,
// then rename), so a crash mid-write leaves the previous one intact:
//   model.safetensors      parameters (fp32) under their Hugging Face names, buffers included
//   optimizer.safetensors  AdamW moments: exp_avg.<name>, exp_avg_sq.<name> (trainable only)
//   state.json             step, optimizer steps, RNG state, data cursor, tokens seen
//   config.toml            the resolved run configuration
// A run directory keeps checkpoints under checkpoints/step_NNNNNNN and names the newest in
// checkpoints/latest.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/loader.h"
#include "model/params.h"
#include "optim/optimizer.h"
#include "train/config.h"

namespace mop {

struct TrainState {
  int64_t step = 0;           // optimizer steps completed
  uint64_t rng_state = 0;     // sampling RNG
  data::Cursor cursor;        // training data position
  int64_t tokens_seen = 0;
  double elapsed_s = 0;       // training time before this checkpoint (for the ETA)
};

// A sharded run's checkpoint (parallel/sharded_checkpoint.h) names its shards in this file instead
// of having a model.safetensors.
inline constexpr const char* kShardIndex = "shards.json";

// state.json's training-state fields (format_version included), and their reader: checks the
// version and that the state is there; errors name the file.
nlohmann::json train_state_json(const TrainState& st, int64_t optimizer_steps);
nlohmann::json read_train_state(const std::string& state_path, TrainState* st, int64_t* optimizer_steps);
// Removes all but the newest `keep` step_* directories under root (never `newest`).
std::vector<std::string> prune_run_checkpoints(const std::string& root, int64_t keep, const std::string& newest);

// Writes dir atomically. opt and st may be null (weights-only checkpoint, e.g. from import).
void save_checkpoint(const std::string& dir, const Config& cfg, const ParamTable& t, const float* params,
                     const AdamW* opt, const TrainState* st);
// A run directory (uses checkpoints/latest) or a checkpoint directory -> the checkpoint directory.
std::string resolve_checkpoint(const std::string& path);
// The checkpoint's config with overrides applied on top.
Config checkpoint_config(const std::string& dir, const Overrides& overrides);
// Loads weights; and, when opt / st are non-null, the optimizer moments and training state
// (which must then exist). Shapes are checked against the table; errors name the file.
void load_checkpoint(const std::string& dir, const ParamTable& t, float* params, AdamW* opt, TrainState* st);
bool checkpoint_has_state(const std::string& dir);

// Saves into run_dir/checkpoints/step_NNNNNNN, updates `latest`, removes all but the newest keep.
std::string save_run_checkpoint(const std::string& run_dir, int64_t keep, const Config& cfg, const ParamTable& t,
                                const float* params, const AdamW& opt, const TrainState& st);

}  // namespace mop
