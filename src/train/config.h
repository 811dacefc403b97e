// The run configuration: a documented tree of keys (`model.hidden`, `train.lr`, ...) loaded
// from a TOML file, then `--set key=value` overrides. Unknown keys are errors that suggest the
// nearest valid key. `model.preset` is applied first, so explicit model keys override it.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"

namespace mop {

struct TrainConfig {
  int64_t steps = 500;             // optimizer steps
  uint64_t seed = 1234;            // init, data order and sampling
  int64_t seq_len = 256;           // tokens per sequence
  int64_t batch = 8;               // sequences per micro-batch
  int64_t grad_accum = 1;          // micro-batches per optimizer step
  double lr = 3e-3;                // peak learning rate
  double min_lr_ratio = 0.1;       // final lr = lr * min_lr_ratio (cosine, linear)
  int64_t warmup = 20;             // linear warmup steps
  std::string schedule = "cosine"; // cosine | linear | constant
  double weight_decay = 0.1;
  bool decay_embeddings = false;   // weight decay on the input embedding (norms never decay)
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double clip = 1.0;               // global gradient-norm clip; 0 = off
  std::string checkpointing = "none";  // none | full (recompute each layer in backward) | selective (GPU)
  int64_t log_every = 10;          // progress line every N steps (metrics.jsonl gets every step)
  int64_t eval_every = 100;        // evaluate on the held-out split every N steps; 0 = off
  int64_t eval_batches = 4;        // micro-batches per evaluation
  int64_t save_every = 0;          // checkpoint every N steps; 0 = only at the end
  int64_t keep_checkpoints = 2;    // newest checkpoints kept
  int64_t sample_tokens = 200;     // bytes generated at the end to show what the model learned; 0 = off
  double sample_temperature = 0.7;
  double peak_tflops = 0;          // MFU denominator; 0 = 790 on an H200, an estimate on the CPU
  bool timing = false;             // GPU: time the step's phases (CUDA events); metrics.jsonl's phase_ms
  std::string trace;               // GPU: Chrome trace of one step (CUPTI) to this file; "{rank}" per rank
  int64_t trace_step = 0;          // the step train.trace records; 0 = the last step of the run
  // The step train.trace records (1-based), or 0 without a trace.
  int64_t traced_step() const { return trace.empty() ? 0 : trace_step > 0 ? trace_step : steps; }
  bool deterministic = false;      // GPU: bit-identical runs (cuDNN's deterministic attention backward, ~15% slower)
  int64_t threads = 0;             // CPU threads; 0 = all cores up to 8
};

struct DataConfig {
  std::string path;                // shard directory or file from `mop data prepare`; empty = built-in corpus
  std::string val_path;            // held-out shards; empty = the val_* shards beside path
  int64_t builtin_docs = 4000;     // documents generated for the built-in corpus
  bool synthetic = false;          // uniformly random tokens (benchmarks): no corpus, no held-out split
};

struct RunConfig {
  std::string name;                // default: the model preset
  std::string dir;                 // default: runs/<name>
  double memory_limit_gib = 0;     // cap on tracked memory (tests, and to emulate a smaller device); 0 = none
};

// How the model is spread over the ranks of a multi-process run (mop launch, torchrun, mpirun,
// srun). The data-parallel degree is the world size; train.batch is the global batch.
struct ParallelConfig {
  int64_t zero = 0;                // ZeRO stage: 0 replicate, 1 shard optimizer state, 2 + gradients, 3 + parameters
  int64_t ep = 1;                  // expert-parallel degree: divides the world size and model.experts
  int64_t world = 0;               // expected world size (the launcher's); 0 = any. Written resolved to the run config
  double timeout_s = 600;          // a collective waiting longer than this fails, naming the group and operation
  std::string gpu_comm = "nccl";   // device collectives: nccl | host (through Gloo; ranks may share a GPU) | skip (timing)
  bool ep_overlap = false;         // GPU, ep > 1: expert weight gradients on a second stream beside the exchange
  bool ep_balance = false;         // GPU, ep > 1: least-loaded balancing of each MoE layer (parallel/expert_balance.h)
  int64_t ep_balance_min_rows = 128;   // smallest block of pairs, and smallest gain, a move is made for
  int64_t ep_balance_max_guests = 4;   // experts a rank computes as a guest per layer (their weights lent to it)
};

struct Config {
  std::string device = "auto";     // auto | cpu | cuda
  ModelConfig model;
  ParallelConfig parallel;
  TrainConfig train;
  DataConfig data;
  RunConfig run;

  void validate() const;          // throws with the offending values
  std::string run_dir() const;     // resolved run directory
  std::string to_toml() const;     // every key, resolved, with its documentation as comments
};

// key -> value text as given on the command line (`--set train.lr=1e-3`).
using Overrides = std::vector<std::pair<std::string, std::string>>;
Overrides parse_overrides(const std::vector<std::string>& sets);  // "a.b=c" -> (a.b, c)
// Loads file (may be empty: defaults only), applies overrides, validates.
Config load_config(const std::string& file, const Overrides& overrides);
Config parse_config_text(const std::string& toml_text, const std::string& origin, const Overrides& overrides);
std::vector<std::string> config_keys();  // every valid key, for docs and the nearest-key hint
std::string config_reference();          // "key = default  # doc" lines

}  // namespace mop
