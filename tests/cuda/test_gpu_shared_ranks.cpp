// The multi-rank GPU paths on ONE GPU: `mop launch --nproc N` with parallel.gpu_comm = host, so the
// ranks share the GPU and the device collectives go through host memory and Gloo (NCCL refuses two
// ranks on one device). What this checks is the GPU decoder's distributed logic, not NCCL:
//   * ZeRO 1, 2 and 3 give the same per-step losses as ZeRO 0 on the same ranks, bit for bit
//     (deterministic mode): reduce-scatter + chunked AdamW + all-gather is the same arithmetic as
//     all-reduce + whole AdamW when two ranks' sums are a + b. With one micro-batch a step (bf16
//     gradients, the slotted gradients of zero 2 and 3) and with two (fp32 gradients).
//   * 4 ranks with ep = 2: expert units sharded over their replicas too (gathered into slots).
//   * data parallel, and expert parallel (the token-once exchange), against one rank, within the
//     bf16 tolerance of tests/multigpu.
//   * a zero 3 checkpoint resumes bit-identically on the same layout and resumes on another one.
//   * a sigmoid router's bias survives a sharded resume.
//   * with ep = 2, selective recompute gives the losses of none bit for bit, and so does running
//     the expert weight gradients on their own stream (parallel.ep_overlap).
//   * collectives that complete late (the staged group is asynchronous like NCCL, and can be made
//     slower) change no bit: every kernel waits for the collectives it depends on.
//   * parallel.gpu_comm = skip runs, and `mop bench --skip-steps` replays the recorded routing in
//     the steps it runs without communication (every rank routes the recorded expert counts).
//   * parallel.ep_balance moves blocks of pairs to their sources (the ranks' loads even out) and
//     trains as the unbalanced run does within the bf16 tolerance, with late collectives and with
//     ep_overlap bit for bit as itself.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "run_mop.h"

namespace fs = std::filesystem;

namespace {

using mop::test::metric_losses;
using mop::test::run_mop;

struct SharedGpu : ::testing::Test {
  fs::path dir;
  void SetUp() override {
    if (::mop::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
    dir = fs::temp_directory_path() / ("mop_shared_" + std::to_string(::getpid()));
    fs::remove_all(dir);
  }
  void TearDown() override {
    if (!dir.empty()) fs::remove_all(dir);
  }
  // Trains and returns the per-step losses (empty on failure, with the output printed).
  std::vector<double> train(const std::string& name, int ranks, const std::string& sets, int steps = 12,
                            const std::string& env = "") {
    const std::string args =
        "train --set device=cuda --set train.sample_tokens=0 --set train.log_every=100 --set train.eval_every=0 "
        "--set train.deterministic=true --set data.builtin_docs=400 --set parallel.gpu_comm=host "
        "--set train.steps=" +
        std::to_string(steps) + " " + sets + " --set run.dir=" + (dir / name).string();
    const mop::test::MopResult r =
        run_mop(ranks > 1 ? "launch --nproc " + std::to_string(ranks) + " -- " + args : args, env);
    EXPECT_EQ(r.code, 0) << name << ":\n" << r.out;
    if (r.code != 0) return {};
    return metric_losses(dir / name);
  }
};

void expect_same(const std::vector<double>& got, const std::vector<double>& ref, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(got[i], ref[i]) << what << " step " << i + 1;
}

TEST_F(SharedGpu, ZeroStagesMatchZeroZeroBitForBit) {
  for (const char* accum : {"--set train.grad_accum=1 ", "--set train.grad_accum=2 "}) {
    for (const char* ep : {"", "--set parallel.ep=2 "}) {
      const std::string base = std::string(accum) + ep;
      const std::vector<double> ref = train("z0", 2, base + "--set parallel.zero=0");
      ASSERT_EQ(ref.size(), 12u) << base;
      for (int z = 1; z <= 3; ++z)
        expect_same(train("z" + std::to_string(z), 2, base + "--set parallel.zero=" + std::to_string(z)), ref,
                    base + "zero " + std::to_string(z));
      fs::remove_all(dir);
    }
  }
}

TEST_F(SharedGpu, FourRanksExpertReplicasSharded) {
  // ep = 2 on 4 ranks: every expert unit has 2 replicas, so zero 3 gathers experts into slots too.
  const std::string base = "--set train.grad_accum=1 --set parallel.ep=2 ";
  const std::vector<double> ref = train("z0", 4, base + "--set parallel.zero=0", 8);
  ASSERT_EQ(ref.size(), 8u);
  const std::vector<double> z3 = train("z3", 4, base + "--set parallel.zero=3", 8);
  ASSERT_EQ(z3.size(), ref.size());
  // Four ranks sum in another order than two (Gloo's ring): fp32 reduction-order tolerance.
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(z3[i], ref[i], 1e-5 * ref[i]) << "step " << i + 1;
  // Expert weight gradients on their own stream, reduced over the replicas from their slots.
  expect_same(train("z3_overlap", 4, base + "--set parallel.zero=3 --set parallel.ep_overlap=true", 8), z3,
              "zero 3, ep_overlap");
}

TEST_F(SharedGpu, ExpertParallelSelectiveRecomputeIsExact) {
  // Selective recompute keeps the received token rows and expands them again in backward: the
  // same bits as keeping the expanded rows.
  const std::string base = "--set train.grad_accum=1 --set parallel.ep=2 --set parallel.zero=3 ";
  const std::vector<double> ref = train("none", 2, base + "--set train.checkpointing=none", 8);
  ASSERT_EQ(ref.size(), 8u);
  expect_same(train("selective", 2, base + "--set train.checkpointing=selective", 8), ref, "selective");
  // The expert weight gradients on their own stream (parallel.ep_overlap): the same products.
  for (const char* ck : {"none", "selective"})
    expect_same(train(std::string("overlap_") + ck, 2,
                      base + "--set parallel.ep_overlap=true --set train.checkpointing=" + ck, 8),
                ref, std::string("ep_overlap, ") + ck);
}

TEST_F(SharedGpu, ParallelLayoutsMatchOneRank) {
  // bf16 roundings move with the split of the batch (tests/multigpu's tolerance and reasons); with
  // ep = 2 the owners' partial sums are rounded to bf16 too. The first step's loss is forward only;
  // its gradient norm checks backward (dense, experts, gates).
  const std::string base = "--set train.grad_accum=2 ";
  const std::vector<double> one = train("one", 1, base, 12);
  const std::vector<double> one_norm = mop::test::metric_values(dir / "one", "grad_norm");
  ASSERT_EQ(one.size(), 12u);
  for (const char* layout : {"--set parallel.zero=3", "--set parallel.zero=3 --set parallel.ep=2"}) {
    const std::vector<double> two = train("two", 2, base + layout, 12);
    ASSERT_EQ(two.size(), one.size()) << layout;
    const std::vector<double> two_norm = mop::test::metric_values(dir / "two", "grad_norm");
    EXPECT_NEAR(two[0], one[0], 1e-3 * one[0]) << layout;
    EXPECT_NEAR(two_norm[0], one_norm[0], 1e-2 * one_norm[0]) << layout;
    for (size_t i = 0; i < one.size(); ++i) EXPECT_NEAR(two[i], one[i], 1e-2 * one[i]) << layout << " step " << i + 1;
    fs::remove_all(dir / "two");
  }
}

TEST_F(SharedGpu, ZeroThreeCheckpointResumes) {
  const std::string base = "--set train.grad_accum=1 --set parallel.zero=3 --set train.save_every=6 ";
  const std::vector<double> full = train("full", 2, base, 12);
  ASSERT_EQ(full.size(), 12u);
  const fs::path ck = dir / "full" / "checkpoints" / "step_0000006";
  ASSERT_TRUE(fs::exists(ck / "shards.json")) << ck;
  const std::vector<double> resumed = train("resumed", 2, base + "--resume " + ck.string(), 12);
  ASSERT_EQ(resumed.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(resumed[i], full[6 + i]) << "step " << 7 + i;
  // Another layout reads the same checkpoint whole (resharding) and trains on.
  const std::vector<double> other = train("other", 2, "--set train.grad_accum=1 --set parallel.zero=1 "
                                                      "--set parallel.ep=2 --resume " + ck.string(), 8);
  EXPECT_EQ(other.size(), 2u);
}

// A sigmoid router's balance bias is a buffer the host updates every step: the shard files must carry
// the host's values (not the units' stale master copies), so a resumed run continues bit for bit.
TEST_F(SharedGpu, RouterBiasSurvivesShardedResume) {
  const std::string base =
      "--set model.family=deepseek_v3 --set model.router=sigmoid --set model.shared_experts=1 "
      "--set model.layers=3 --set model.dense_layers=1 --set model.router_groups=4 --set model.router_topk_groups=2 "
      "--set train.grad_accum=1 --set parallel.zero=2 --set parallel.ep=2 --set train.save_every=4 ";
  const std::vector<double> full = train("full", 2, base, 8);
  ASSERT_EQ(full.size(), 8u);
  const fs::path ck = dir / "full" / "checkpoints" / "step_0000004";
  const std::vector<double> resumed = train("resumed", 2, base + "--resume " + ck.string(), 8);
  ASSERT_EQ(resumed.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(resumed[i], full[4 + i]) << "step " << 5 + i;
}

// The staged collectives complete late on purpose (MOP_STAGED_LAG_US): a compute kernel that reads
// a gather's output, or overwrites a reduction's input, without waiting for the collective's event
// would then read or send other bits. Every layout of the comm stream's overlap (zero 2 and 3:
// gradient slots reduced during backward, weight slots gathered one layer ahead, post-update
// gathers overlapping the next forward) and the expert exchange must give the same bits.
TEST_F(SharedGpu, LateCollectivesChangeNothing) {
  for (const char* layout : {"--set train.grad_accum=1 --set parallel.zero=3 --set parallel.ep=2",
                             "--set train.grad_accum=1 --set parallel.zero=2",
                             "--set train.grad_accum=2 --set parallel.zero=1 --set parallel.ep=2",
                             "--set train.grad_accum=1 --set parallel.zero=3 --set parallel.ep=2 --set parallel.ep_overlap=true",
                             "--set train.grad_accum=2 --set parallel.zero=1 --set parallel.ep=2 --set parallel.ep_overlap=true"}) {
    const std::vector<double> ref = train("prompt", 2, layout, 6);
    ASSERT_EQ(ref.size(), 6u) << layout;
    expect_same(train("late", 2, layout, 6, "MOP_STAGED_LAG_US=3000"), ref, std::string(layout) + ", late");
    fs::remove_all(dir);
  }
}

// parallel.gpu_comm = skip (timing the step without communication) runs the same layouts; its
// losses are meaningless, so only the run itself is checked.
TEST_F(SharedGpu, SkippedCommunicationRuns) {
  const std::vector<double> l =
      train("skip", 2, "--set parallel.gpu_comm=skip --set parallel.zero=3 --set parallel.ep=2", 3);
  EXPECT_EQ(l.size(), 3u);
}

// mop bench --skip-steps: after the timed steps, steps with every device collective skipped whose
// MoE layers replay the last real step's routing, so they run the same expert work; each rank
// reports whether its skipped steps routed exactly the recorded counts.
TEST_F(SharedGpu, SkippedStepsReplayTheRouting) {
  const mop::test::MopResult r = run_mop(
      "launch --nproc 2 -- bench --set device=cuda --set parallel.gpu_comm=host --set parallel.zero=3 "
      "--set parallel.ep=2 --set train.batch=4 --set train.seq_len=128 --set train.checkpointing=selective "
      "--steps 3 --warmup 1 --skip-steps 2");
  ASSERT_EQ(r.code, 0) << r.out;
  auto count = [&](const std::string& needle) {
    size_t n = 0;
    for (size_t at = r.out.find(needle); at != std::string::npos; at = r.out.find(needle, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("\"skip_routing_matches\":true"), 2u) << r.out;  // one JSON line per rank
  EXPECT_EQ(count("\"skip_steps\":2"), 2u) << r.out;
  EXPECT_EQ(count("\"exposed_comm_share\":"), 2u) << r.out;
}

// parallel.ep_balance: the tiny router at initialisation loads the two halves of the experts
// unevenly enough that blocks move (min_rows 1) and the largest load falls. The moved pairs' outputs
// and weight gradients are summed in another order (each partial rounded to bf16 as it travels), so
// the losses are the unbalanced run's within ParallelLayoutsMatchOneRank's tolerance; the side
// stream's loans and returns are ordered by events, so collectives held back change no bit, and
// the weight gradients on their own stream (ep_overlap) are the same products.
TEST_F(SharedGpu, BalancedExpertParallelism) {
  const std::string bal = "--set parallel.ep_balance=true --set parallel.ep_balance_min_rows=1 ";
  for (const char* layout :
       {"--set train.grad_accum=1 --set parallel.ep=2 --set parallel.zero=3 --set train.checkpointing=selective ",
        "--set train.grad_accum=2 --set parallel.ep=2 --set parallel.zero=1 "}) {
    const std::string base = layout;
    const std::vector<double> plain = train("plain", 2, base, 8);
    ASSERT_EQ(plain.size(), 8u) << base;
    const std::vector<double> got = train("balanced", 2, base + bal, 8);
    ASSERT_EQ(got.size(), plain.size()) << base;
    EXPECT_NEAR(got[0], plain[0], 1e-3 * plain[0]) << base;
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], plain[i], 1e-2 * plain[i]) << base << "step " << i + 1;
    const std::vector<double> load = mop::test::metric_values(dir / "balanced", "ep_load_max_over_mean");
    const std::vector<double> before = mop::test::metric_values(dir / "balanced", "ep_load_max_over_mean_unbalanced");
    ASSERT_EQ(load.size(), got.size()) << base;
    ASSERT_EQ(before.size(), got.size()) << base;
    int lowered = 0;
    for (size_t i = 0; i < load.size(); ++i) {
      EXPECT_LE(load[i], before[i]) << base << "step " << i + 1;
      EXPECT_GE(load[i], 1.0) << base << "step " << i + 1;
      lowered += load[i] < before[i];
    }
    EXPECT_GT(lowered, 0) << base << "no block moved in any step: the balanced path went untested";
    expect_same(train("late", 2, base + bal, 8, "MOP_STAGED_LAG_US=3000"), got, base + "balanced, late");
    expect_same(train("overlap", 2, base + bal + "--set parallel.ep_overlap=true", 8), got, base + "balanced, ep_overlap");
    fs::remove_all(dir);
  }
  // Four ranks, ep = 2: the experts sharded over their two replicas and gathered into slots (zero
  // 3), their gradients reduced over the replicas after the guests' are added.
  const std::string four = "--set train.grad_accum=1 --set parallel.ep=2 --set parallel.zero=3 ";
  const std::vector<double> plain = train("plain4", 4, four, 6);
  const std::vector<double> got = train("balanced4", 4, four + bal, 6);
  ASSERT_EQ(plain.size(), 6u);
  ASSERT_EQ(got.size(), plain.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], plain[i], 1e-2 * plain[i]) << "4 ranks, step " << i + 1;
}

}  // namespace
