// `mop` subcommands. Each returns the process exit code; errors are thrown as mop::Error and
// printed once by main.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cli/ops_bench/ops_bench.h"

namespace mop::cli {

struct TrainArgs {
  std::string config;
  std::vector<std::string> sets;
  std::string resume;
  std::string init_from;
};
int train(const TrainArgs& a);

struct EvalArgs {
  std::string checkpoint, data;
  std::vector<std::string> sets;
  int64_t max_batches = 0;
};
int eval(const EvalArgs& a);

struct BenchArgs {
  std::string config;
  std::vector<std::string> sets;
  int64_t steps = 20;
  int64_t warmup = 5;
  int64_t skip_steps = 0;  // then steps with the device collectives skipped (TrainOptions::skip_comm_steps)
};
// Trains on synthetic tokens and prints one JSON line: tokens/s, TFLOP/s, MFU, peak memory by category.
int bench(const BenchArgs& a);
// mop bench ops: every CUDA kernel timed on a preset's shapes (bench/ops_bench.h); exits 2 with a
// clear message without the CUDA backend or a GPU.
int bench_ops(const bench::OpsBenchOptions& o);

// mop launch --nproc N -- <subcommand ...>: N local ranks; the first failure stops the others.
int launch(int nproc, const std::vector<std::string>& args);
// Diagnostic: prints what this rank learned from its launcher, as one JSON line. With
// fail_on_rank >= 0 that rank exits with code 1 and the others wait up to 60 s (launcher tests).
int rank_info(int fail_on_rank);

int export_hf(const std::string& checkpoint, const std::string& out);
int import_hf(const std::string& hf_dir, const std::string& out, const std::vector<std::string>& sets);

struct PrepareArgs {
  std::vector<std::string> inputs;
  std::string out;
  double val_fraction = 0.05;
  uint64_t seed = 1;
  int64_t shard_tokens = 100'000'000;
};
int data_prepare(const PrepareArgs& a);

}  // namespace mop::cli
