#include "cli/commands.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint.h"
#include "checkpoint/hf.h"
#include "parallel/sharded_checkpoint.h"
#include "data/prepare.h"
#include "model/decoder.h"
#include "parallel/launch.h"
#include "train/data_setup.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace mop::cli {

int train(const TrainArgs& a) {
  const Overrides ov = parse_overrides(a.sets);
  Config cfg;
  if (!a.resume.empty()) {
    MOP_CHECK(a.config.empty(), "--resume continues with the checkpoint's config; use --set to change keys, not --config");
    // The checkpoint's world size is a record, not a requirement: a run may resume on another
    // layout (the checkpoint is then resharded) unless --set parallel.world asks for one.
    Overrides with_world = ov;
    if (std::none_of(ov.begin(), ov.end(), [](const auto& kv) { return kv.first == "parallel.world"; }))
      with_world.insert(with_world.begin(), {"parallel.world", "0"});
    cfg = checkpoint_config(resolve_checkpoint(a.resume), with_world);
  } else {
    cfg = load_config(a.config, ov);
  }
  Trainer t(cfg, TrainOptions{a.resume, a.init_from, false});
  t.run();
  return 0;
}

int eval(const EvalArgs& a) {
  const std::string dir = resolve_checkpoint(a.checkpoint);
  Config cfg = checkpoint_config(dir, parse_overrides(a.sets));
  configure_threads(cfg.train.threads);
  ParamTable table = build_param_table(cfg.model, cfg.train.decay_embeddings);
  HostArray<float> params(size_t(table.total), Mem::params);
  // A single-rank or a sharded checkpoint (any layout): the whole model, on one rank.
  read_checkpoint_for_table(dir, cfg.model, cfg.train.decay_embeddings, table, params.data(), nullptr, nullptr,
                            nullptr, nullptr);
  Decoder<float> model(cfg.model, table);
  model.bind(params.data(), nullptr);

  auto loader = make_loader_for(a.data, int(cfg.model.vocab_size), int(cfg.train.seq_len), cfg.train.seed);
  // Every window once, in the loader's epoch-0 order (the sum does not depend on the order).
  uint64_t left = loader->num_windows();
  if (a.max_batches > 0) left = std::min<uint64_t>(left, uint64_t(a.max_batches * cfg.train.batch));
  double sum = 0;
  int64_t tokens = 0;
  data::Batch b;
  while (left > 0) {
    const int rows = int(std::min<uint64_t>(left, uint64_t(cfg.train.batch)));
    loader->next_batch(rows, b);
    LossStats st = model.forward_loss(token_batch(b));
    sum += st.ce_sum;
    tokens += st.ce_tokens;
    left -= uint64_t(rows);
  }
  fmt::print("eval_loss={:.6f} tokens={}\n", tokens ? sum / double(tokens) : 0.0, tokens);
  return 0;
}

int bench(const BenchArgs& a) {
  MOP_CHECK(a.steps > a.warmup && a.warmup >= 0, "--steps ({}) must exceed --warmup ({})", a.steps, a.warmup);
  // Defaults the user's --set may override: phase timing, and the PyTorch baseline's optimizer
  // settings (bench/baselines/torch_fsdp2.py: constant lr 3e-4; the training default, 3e-3 after 20
  // warmup steps, is for the tiny preset). The data differ: the baseline repeats one random batch.
  std::vector<std::string> sets = {"train.timing=true", "train.lr=3e-4", "train.warmup=0", "train.schedule=constant"};
  sets.insert(sets.end(), a.sets.begin(), a.sets.end());
  for (const char* s : {"data.synthetic=true", "train.eval_every=0", "train.sample_tokens=0"}) sets.emplace_back(s);
  sets.push_back(fmt::format("train.steps={}", a.steps));
  Config cfg = load_config(a.config, parse_overrides(sets));
  MOP_CHECK(a.skip_steps >= 0, "--skip-steps must not be negative, got {}", a.skip_steps);
  TrainOptions to{"", "", true, true};
  to.skip_comm_steps = a.skip_steps;
  Trainer t(cfg, to);
  TrainResult r = t.run();
  std::vector<double> times;
  // A step recorded by train.trace runs slower (CUPTI logs every CUDA call): it is not timed.
  const int64_t traced = cfg.train.traced_step();
  for (int64_t s = a.warmup; s < int64_t(r.step_seconds.size()); ++s)
    if (s + 1 != traced) times.push_back(r.step_seconds[size_t(s)]);
  MOP_CHECK(!times.empty(), "mop bench: no step left to time (--steps {}, --warmup {}, the traced step {})", a.steps,
            a.warmup, traced);
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  const double tps = double(r.tokens_per_step) / double(r.world) / median;  // per rank (per GPU)
  const Device dev = r.device == "cuda" ? Device::cuda : Device::cpu;
  const MemoryTracker& mt = memory_tracker(dev);
  nlohmann::json j;
  j["impl"] = "mop";
  j["preset"] = cfg.model.preset;
  j["layers"] = cfg.model.layers;
  j["device"] = r.device;
  j["world"] = r.world;
  j["rank"] = r.rank;
  j["ep"] = cfg.parallel.ep;
  j["zero"] = cfg.parallel.zero;
  j["gpu_comm"] = cfg.parallel.gpu_comm;
  j["ep_overlap"] = cfg.parallel.ep_overlap;
  j["ep_balance"] = cfg.parallel.ep_balance;
  j["checkpointing"] = cfg.train.checkpointing;
  j["seq"] = cfg.train.seq_len;
  j["batch"] = cfg.train.batch;
  j["grad_accum"] = cfg.train.grad_accum;
  j["steps_timed"] = times.size();
  j["step_s_median"] = median;
  j["tokens_per_s"] = tps;  // per rank
  j["tflops"] = r.flops_per_token * tps / 1e12;
  j["mfu"] = r.flops_per_token * tps / r.peak_flops;
  j["peak_gib"] = double(mt.peak_total()) / double(1ull << 30);
  nlohmann::json cats;
  for (int i = 0; i < kMemCategories; ++i)
    if (mt.peak(Mem(i))) cats[mem_name(Mem(i))] = double(mt.peak(Mem(i))) / double(1ull << 30);
  j["peak_gib_by_category"] = cats;
  // Each phase's median over the timed steps (train.timing; model/cuda/phase_timer.h).
  auto phase_medians = [&](const std::vector<std::vector<std::pair<std::string, double>>>& steps, size_t first) {
    std::vector<std::pair<std::string, std::vector<double>>> ph;
    for (size_t s = first; s < steps.size(); ++s) {
      if (&steps == &r.phase_ms && int64_t(s) + 1 == traced) continue;
      for (const auto& [name, ms] : steps[s]) {
        auto it = std::find_if(ph.begin(), ph.end(), [&](const auto& p) { return p.first == name; });
        if (it == ph.end()) it = ph.insert(ph.end(), {name, {}});
        it->second.push_back(ms);
      }
    }
    nlohmann::json pj = nlohmann::json::object();
    for (auto& [name, v] : ph) {
      std::sort(v.begin(), v.end());
      pj[name] = v[v.size() / 2];
    }
    return pj;
  };
  if (r.phase_ms.size() == r.step_seconds.size() && !r.phase_ms.empty())
    j["phase_ms_median"] = phase_medians(r.phase_ms, size_t(a.warmup));
  // Expert parallelism: how uneven the ranks' expert work was over the timed steps (medians).
  if (r.ep_load.size() == r.step_seconds.size() && int64_t(r.ep_load.size()) > a.warmup) {
    auto median_of = [&](auto v) {
      v.erase(v.begin(), v.begin() + a.warmup);
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    j["ep_load_max_over_mean"] = median_of(r.ep_load);
    j["ep_load_max_over_mean_unbalanced"] = median_of(r.ep_load_unbalanced);
    j["ep_guest_pairs"] = median_of(r.ep_guest_pairs);
  }
  // The same steps with their communication skipped: the exposed share is what the skipping saves.
  if (!r.skip_step_seconds.empty()) {
    std::vector<double> skipped = r.skip_step_seconds;
    std::sort(skipped.begin(), skipped.end());
    const double ms = skipped[skipped.size() / 2];
    j["skip_steps"] = skipped.size();
    j["skip_step_s_median"] = ms;
    j["exposed_comm_s"] = median - ms;
    j["exposed_comm_share"] = (median - ms) / median;
    j["skip_routing_matches"] = r.skip_routing_matches;
    if (!r.skip_phase_ms.empty()) j["skip_phase_ms_median"] = phase_medians(r.skip_phase_ms, 0);
  }
  j["loss_first"] = r.losses.front();
  j["loss_last"] = r.losses.back();
  fmt::print("{}\n", j.dump());
  return 0;
}

int bench_ops(const bench::OpsBenchOptions& o) { return bench::run_ops_bench(o); }

int launch(int nproc, const std::vector<std::string>& args) {
  MOP_CHECK(!args.empty(), "mop launch needs a subcommand after --, e.g. mop launch --nproc 2 -- train");
  LaunchOptions o;
  o.nproc = nproc;
  o.program = fs::read_symlink("/proc/self/exe").string();
  o.args = args;
  return launch_local(o, [](const std::string& m) { fmt::print(stderr, "launch: {}\n", m); });
}

int rank_info(int fail_on_rank) {
  const RankInfo r = detect_rank();
  nlohmann::json j;
  j["rank"] = r.rank;
  j["world"] = r.world;
  j["local_rank"] = r.local_rank;
  j["launcher"] = r.launcher;
  j["master_addr"] = r.master_addr;
  j["master_port"] = r.master_port;
  fmt::print("{}\n", j.dump());
  std::fflush(stdout);
  if (fail_on_rank < 0) return 0;
  if (r.rank == fail_on_rank) return 1;
  std::this_thread::sleep_for(std::chrono::seconds(60));
  return 0;
}

int export_hf(const std::string& checkpoint, const std::string& out) {
  const std::string dir = resolve_checkpoint(checkpoint);
  Config cfg = checkpoint_config(dir, {});
  ParamTable table = build_param_table(cfg.model, cfg.train.decay_embeddings);
  HostArray<float> params(size_t(table.total), Mem::params);
  // Single-rank or sharded (any layout): the whole model.
  read_checkpoint_for_table(dir, cfg.model, cfg.train.decay_embeddings, table, params.data(), nullptr, nullptr,
                            nullptr, nullptr);
  hf_export(out, cfg.model, table, params.data());
  fmt::print("exported {} ({} parameters) to {}\n", dir, table.total, out);
  return 0;
}

int import_hf(const std::string& hf_dir, const std::string& out, const std::vector<std::string>& sets) {
  Config cfg = load_config("", parse_overrides(sets));
  cfg.model = hf_read_config(hf_dir);
  cfg.run.name = "import";
  cfg.validate();
  ParamTable table = build_param_table(cfg.model, cfg.train.decay_embeddings);
  HostArray<float> params(size_t(table.total), Mem::params);
  hf_load_weights(hf_dir, table, params.data());
  save_checkpoint(out, cfg, table, params.data(), nullptr, nullptr);
  fmt::print("imported {} ({} parameters) into checkpoint {}\n", hf_dir, table.total, out);
  return 0;
}

int data_prepare(const PrepareArgs& a) {
  MOP_CHECK(a.shard_tokens > 0, "--shard-tokens must be positive, got {}", a.shard_tokens);
  data::PrepareStats s = data::prepare_shards(a.inputs, a.out, a.val_fraction, a.seed, size_t(a.shard_tokens));
  fmt::print("prepared {} documents ({} tokens): train {} docs / {} tokens in {} shard(s), val {} docs / {} tokens in {} shard(s) -> {}\n",
             s.docs, s.tokens, s.train_docs, s.train_tokens, s.train_shards, s.val_docs, s.val_tokens, s.val_shards,
             a.out);
  return 0;
}

}  // namespace mop::cli
