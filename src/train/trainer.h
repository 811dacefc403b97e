// The training loop on the CPU backend: micro-batches -> forward/backward -> global-norm clip ->
// AdamW, with metrics, evaluation, checkpoints and resume.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "core/rng.h"
#include "model/decoder.h"
#include "optim/optimizer.h"
#include "train/config.h"
#include "train/data_setup.h"
#include "train/metrics.h"

namespace mop {

struct TrainOptions {
  std::string resume;            // run or checkpoint directory to continue from
  std::string init_from;         // checkpoint whose weights initialise the model (fresh optimizer)
  bool quiet = false;            // no progress lines (tests)
};

struct TrainResult {
  std::vector<double> losses;    // per optimizer step run in this invocation
  double final_eval_loss = -1;
  double unigram_entropy = -1;
  std::string last_checkpoint;
  std::string sample;
};

class Trainer {
 public:
  Trainer(Config cfg, TrainOptions opt);
  TrainResult run();
  const Config& config() const { return cfg_; }

 private:
  void log(const std::string& line) const;
  double evaluate();
  std::string generate(const std::string& prompt, int n_tokens, double temperature, Rng& rng);
  void update_router_bias(const LossStats& st);

  Config cfg_;
  TrainOptions opt_;
  ParamTable table_;
  HostArray<float> params_, grads_;
  std::unique_ptr<AdamW> adamw_;
  std::unique_ptr<Decoder<float>> model_;
  RunData data_;
  TrainState state_;
  int threads_ = 1;
};

// Sets OpenMP and OpenBLAS threads (0 = all cores); returns the count used.
int configure_threads(int64_t requested);
// "cpu" or "cuda" for cfg.device, with the reason when auto falls back.
std::string resolve_device(const std::string& requested, std::string* note);

}  // namespace mop
