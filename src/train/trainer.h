// The training loop on the CPU backend: micro-batches -> forward/backward -> global-norm clip ->
// AdamW, with metrics, evaluation, checkpoints and resume.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "core/rng.h"
#include "model/decoder.h"
#include "optim/optimizer.h"
#include "parallel/expert_balance.h"
#include "parallel/launch.h"
#include "train/config.h"
#include "train/data_setup.h"
#include "train/metrics.h"

namespace mop {

class GpuDecoder;  // model/cuda/gpu_decoder.h: only with the CUDA backend
class ProcessGroup;
class ZeroParams;
struct Groups;       // parallel/world.h
struct ShardLayout;  // parallel/sharded_checkpoint.h

struct TrainOptions {
  std::string resume;            // run or checkpoint directory to continue from
  std::string init_from;         // checkpoint whose weights initialise the model (fresh optimizer)
  bool quiet = false;            // no progress lines (tests)
  bool bench = false;            // benchmark: no checkpoints, no sample, no config/metrics files
  // Benchmark on the GPU: this many more steps after the last with every device collective
  // skipped and the last step's routing replayed (GpuDecoder::skip_comm): the step without its
  // communication. Their losses are meaningless; they are reported apart (skip_*).
  int64_t skip_comm_steps = 0;
};

struct TrainResult {
  std::vector<double> losses;    // per optimizer step run in this invocation
  double final_eval_loss = -1;
  double unigram_entropy = -1;
  std::string last_checkpoint;
  std::string sample;
  std::vector<double> step_seconds;  // wall time of each optimizer step
  std::vector<std::vector<std::pair<std::string, double>>> phase_ms;  // per step (train.timing)
  // Per step with GPU expert parallelism (StepMetrics::ep_load and the rest); empty otherwise.
  std::vector<double> ep_load, ep_load_unbalanced;
  std::vector<int64_t> ep_guest_pairs;
  int64_t tokens_per_step = 0;      // over all ranks
  int world = 1, rank = 0;
  double flops_per_token = 0;        // DESIGN.md's model FLOPs
  double peak_flops = 0;             // MFU denominator
  std::string device;                // cpu | cuda
  std::vector<double> skip_step_seconds;  // TrainOptions::skip_comm_steps: each skipped step's wall time
  std::vector<std::vector<std::pair<std::string, double>>> skip_phase_ms;
  bool skip_routing_matches = true;   // every skipped step routed the recorded step's expert counts
};

class Trainer {
 public:
  Trainer(Config cfg, TrainOptions opt);
  ~Trainer();
  TrainResult run();
  bool on_gpu() const { return gpu_ != nullptr; }
  const Config& config() const { return cfg_; }

 private:
  void log(const std::string& line) const;
  double evaluate();
  std::string generate(const std::string& prompt, int n_tokens, double temperature, Rng& rng);
  void update_router_bias(const LossStats& st);
  // GPU runs keep the weights and moments on the device; the host weights are refreshed before
  // checkpoints and sampling, and host moments are made (then dropped) only for a checkpoint.
  void sync_from_gpu(bool moments);
  LossStats micro_step(const data::Batch& mb, float ce_scale, float lb_scale, Recompute rc);
  double optimizer_step(double lr);
  // Multi-rank (or sharded) runs: groups, this rank's table and the ZeRO state.
  void setup_parallel(const std::string& device);
  void setup_gpu_comm();  // NCCL groups over the host groups, on the GpuDecoder's stream
  ShardLayout shard_layout() const;
  // Sums over all ranks (no-op on one).
  void sum_over_ranks(double* v, size_t n);
  void sum_over_ranks(int64_t* v, size_t n);
  void next_part(data::Loader& loader, data::Batch& b);  // this rank's rows of the next global batch
  std::string save_checkpoint_now(const std::string& run_dir);

  Config cfg_;
  TrainOptions opt_;
  ParamTable table_;
  HostArray<float> params_, grads_;
  std::unique_ptr<AdamW> adamw_;
  std::unique_ptr<Decoder<float>> model_;
  std::unique_ptr<GpuDecoder> gpu_;
  RunData data_;
  TrainState state_;
  int threads_ = 1;
  RankInfo rank_;
  std::unique_ptr<Groups> groups_;
  ExpertBalanceOptions balance_;  // parallel.ep_balance_* (the CPU backend's MoE layers point at it)
  std::unique_ptr<ZeroParams> zero_;
  struct GpuGroups;
  std::unique_ptr<GpuGroups> gpu_groups_;  // multi-GPU runs (NCCL)
};

// Sets OpenMP and OpenBLAS threads (0 = all cores up to 8, shared by local_ranks ranks); returns
// the count used.
int configure_threads(int64_t requested, int local_ranks = 1);
// "cpu" or "cuda" for cfg.device, with the reason when auto falls back.
std::string resolve_device(const std::string& requested, std::string* note);

}  // namespace mop
