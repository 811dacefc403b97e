// mop: train | eval | bench [ops] | launch | export | import | data prepare | config
// The set of flags is small and frozen by tests/e2e/test_cli.cpp; everything else is a config key
// (`--set key=value`).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli/commands.h"
#include "core/error.h"
#include "train/config.h"

int main(int argc, char** argv) {
  CLI::App app{"mop: memory-efficient Mixture-of-Experts training"};
  app.require_subcommand(1);

  mop::cli::TrainArgs ta;
  auto* train = app.add_subcommand("train", "train a model (default: the tiny preset on the built-in corpus)");
  train->add_option("--config", ta.config, "TOML config file");
  train->add_option("--set", ta.sets, "override a config key: --set train.lr=1e-3 (repeatable)");
  train->add_option("--resume", ta.resume, "continue from a run or checkpoint directory");
  train->add_option("--init-from", ta.init_from, "initialise weights from a checkpoint (fresh optimizer)");

  mop::cli::EvalArgs ea;
  auto* eval = app.add_subcommand("eval", "evaluate a checkpoint; last line: eval_loss=<float> tokens=<int>");
  eval->add_option("--checkpoint", ea.checkpoint, "run or checkpoint directory")->required();
  eval->add_option("--data", ea.data, "token shard, shard directory or text file")->required();
  eval->add_option("--set", ea.sets, "override a config key (e.g. train.seq_len, train.batch)");
  eval->add_option("--max-batches", ea.max_batches, "stop after this many batches (0 = all)");

  mop::cli::BenchArgs ba;
  auto* bench = app.add_subcommand("bench", "train on synthetic tokens; print one JSON line (tokens/s, MFU, memory)");
  bench->add_option("--config", ba.config, "TOML config file");
  bench->add_option("--set", ba.sets, "override a config key, e.g. --set model.preset=moe-1b");
  bench->add_option("--steps", ba.steps, "optimizer steps (default 20)");
  bench->add_option("--warmup", ba.warmup, "untimed first steps (default 5)");
  bench->add_option("--skip-steps", ba.skip_steps,
                    "then this many steps with every device collective skipped and the last step's routing "
                    "replayed: the exposed communication is the step time minus theirs (default 0)");
  mop::bench::OpsBenchOptions oa;
  auto* bench_ops = bench->add_subcommand("ops",
                                          "time every CUDA kernel on a preset's shapes against the ceilings "
                                          "measured in the same run (needs a GPU)");
  bench_ops->add_option("--preset", oa.preset, "model preset whose shapes are timed (default moe-1b)");
  bench_ops->add_option("--seq", oa.seq, "tokens per sequence (default 4096)");
  bench_ops->add_option("--batch", oa.batch, "sequences (default: 4 for moe-1b, 2 otherwise)");
  bench_ops->add_option("--json", oa.json, "also write one JSON object per kernel, one per line, to this file");
  bench_ops->add_option("--only", oa.only,
                        "time only these case groups, comma-separated: memory, gemm, grouped, attention, head "
                        "(the ceilings always run)");

  int nproc = 1;
  auto* launch = app.add_subcommand("launch", "start N local ranks: mop launch --nproc N -- <subcommand ...>");
  launch->add_option("--nproc", nproc, "ranks to start on this node")->required();
  // Everything after "--" belongs to the ranks; it is split off before CLI11 sees the line.
  std::vector<std::string> rank_args;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) != "--") continue;
    rank_args.assign(argv + i + 1, argv + argc);
    argc = i;
    break;
  }

  int fail_on_rank = -1;
  auto* rinfo = app.add_subcommand("rank-info", "print the rank, world size and rendezvous this process sees");
  rinfo->add_option("--fail-on-rank", fail_on_rank, "(tests) this rank exits 1, the others wait");

  std::string ex_ckpt, ex_out;
  auto* exp = app.add_subcommand("export", "write a Hugging Face directory (config.json + model.safetensors)");
  exp->add_option("--checkpoint", ex_ckpt, "run or checkpoint directory")->required();
  exp->add_option("--out", ex_out, "output directory")->required();

  std::string im_in, im_out;
  std::vector<std::string> im_sets;
  auto* imp = app.add_subcommand("import", "read a Hugging Face directory into a mop checkpoint");
  imp->add_option("--hf", im_in, "Hugging Face model directory")->required();
  imp->add_option("--out", im_out, "checkpoint directory to write")->required();
  imp->add_option("--set", im_sets, "override a non-model config key");

  mop::cli::PrepareArgs pa;
  auto* data = app.add_subcommand("data", "data tools");
  data->require_subcommand(1);
  auto* prep = data->add_subcommand("prepare", "text files -> token shards (byte-level tokenizer)");
  prep->add_option("--input", pa.inputs, "text files; documents are separated by blank lines")->required();
  prep->add_option("--out", pa.out, "output directory")->required();
  prep->add_option("--val-fraction", pa.val_fraction, "fraction of documents held out");
  prep->add_option("--seed", pa.seed, "seed of the train/val split");
  prep->add_option("--shard-tokens", pa.shard_tokens, "maximum tokens per shard");

  auto* config = app.add_subcommand("config", "print every config key with its default and meaning");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (*train) return mop::cli::train(ta);
    if (*eval) return mop::cli::eval(ea);
    if (*bench_ops) return mop::cli::bench_ops(oa);
    if (*bench) return mop::cli::bench(ba);
    if (*launch) return mop::cli::launch(nproc, rank_args);
    if (*rinfo) return mop::cli::rank_info(fail_on_rank);
    if (*exp) return mop::cli::export_hf(ex_ckpt, ex_out);
    if (*imp) return mop::cli::import_hf(im_in, im_out, im_sets);
    if (*prep) return mop::cli::data_prepare(pa);
    if (*config) {
      fmt::print("{}", mop::config_reference());
      return 0;
    }
  } catch (const mop::OutOfMemory& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 3;
  } catch (const mop::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  }
  return 0;
}
