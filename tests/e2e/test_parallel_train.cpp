// Multi-rank training on the CPU backend (Gloo), launched with `mop launch` as a user would:
// every layout reproduces the single-rank run's per-step losses, a sharded run resumes
// bit-identically, impossible layouts print their numbers.
//
// Tolerance: the layouts differ from world 1 only in fp32 reduction order (gradients summed over
// ranks, expert rows in another order inside the grouped GEMM, probabilities summed per rank for
// the load-balancing loss). Per-step losses agree to ~1e-9 relative (tiny preset, measured) until
// a token whose top-k experts are nearly tied flips to the other expert under the reordering;
// from then on the runs drift apart slowly (measured: 3e-8 at step 15, 5e-5 at step 20 for ep=2 on
// 4 ranks; the sigmoid router's sign-based bias updates reach 1e-6). So: the first 10 steps within
// 1e-6, every step within 1e-3.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>
#include <tuple>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "run_mop.h"

namespace fs = std::filesystem;

namespace mop {
namespace {

using test::metric_losses;
using test::run_mop;

class ParallelTrain : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mop_par_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // One training run: world 1 directly, else under `mop launch`. Returns its run directory.
  fs::path train(const std::string& name, int world, const std::string& sets) {
    const fs::path rd = dir_ / name;
    const std::string cmd = "train " + common_ + " " + sets + " --set run.dir=" + rd.string();
    test::MopResult r = run_mop(world == 1 ? cmd : "launch --nproc " + std::to_string(world) + " -- " + cmd);
    EXPECT_EQ(r.code, 0) << r.out;
    return rd;
  }

  void expect_parity(const std::vector<double>& ref, const std::vector<double>& got, const std::string& what) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    for (size_t i = 0; i < ref.size(); ++i)
      EXPECT_NEAR(got[i], ref[i], (i < 10 ? 1e-6 : 1e-3) * ref[i]) << what << ", step " << i + 1;
  }

  fs::path dir_;
  std::string common_ =
      "--set device=cpu --set train.threads=1 --set train.sample_tokens=0 --set train.log_every=100 "
      "--set train.eval_every=0 --set data.builtin_docs=400";
};

TEST_F(ParallelTrain, EveryLayoutMatchesOneRank) {
  // One initial checkpoint (train.steps = 0 writes it), then 20 steps of 2 micro-batches each.
  const fs::path init = train("init", 1, "--set train.steps=0");
  ASSERT_TRUE(fs::exists(init / "checkpoints" / "latest"));
  const std::string steps = "--set train.steps=20 --set train.grad_accum=2 --init-from " + init.string();
  const std::vector<double> ref = metric_losses(train("world1", 1, steps));
  ASSERT_EQ(ref.size(), 20u);
  EXPECT_LT(ref.back(), ref.front());
  struct Layout {
    const char* name;
    int world;
    const char* sets;
  };
  for (const Layout& l : {Layout{"zero3_x2", 2, "--set parallel.zero=3"},
                          Layout{"zero1_x2", 2, "--set parallel.zero=1"},
                          Layout{"ep2_x2", 2, "--set parallel.ep=2"},
                          Layout{"ep4_x4", 4, "--set parallel.ep=4"},
                          Layout{"zero3_ep2_x4", 4, "--set parallel.zero=3 --set parallel.ep=2"}})
    expect_parity(ref, metric_losses(train(l.name, l.world, steps + " " + l.sets)), l.name);
}

// parallel.ep_balance: blocks of rows computed by the ranks that routed them with the experts'
// weights lent, their weight gradients added to the owners'. The same fp32 math in another
// reduction order, so the same tolerance as the other layouts; and blocks must have moved (the
// largest rank load falls below the unbalanced one), or the path went untested.
TEST_F(ParallelTrain, BalancedExpertParallelismMatchesOneRank) {
  const fs::path init = train("init", 1, "--set train.steps=0");
  const std::string steps = "--set train.steps=20 --set train.grad_accum=2 --init-from " + init.string() +
                            " --set parallel.ep_balance=true --set parallel.ep_balance_min_rows=1 ";
  const std::vector<double> ref = metric_losses(train("world1", 1, steps));
  ASSERT_EQ(ref.size(), 20u);
  for (const auto& [name, world, sets] :
       {std::tuple<const char*, int, const char*>{"ep2_x2", 2, "--set parallel.ep=2"},
        {"ep4_x4", 4, "--set parallel.ep=4 --set parallel.ep_balance_max_guests=1"},
        {"zero3_ep2_x4", 4, "--set parallel.zero=3 --set parallel.ep=2 --set train.checkpointing=full"}}) {
    const fs::path run = train(name, world, steps + sets);
    expect_parity(ref, metric_losses(run), name);
    const std::vector<double> load = test::metric_values(run, "ep_load_max_over_mean");
    const std::vector<double> before = test::metric_values(run, "ep_load_max_over_mean_unbalanced");
    ASSERT_EQ(load.size(), ref.size()) << name;
    ASSERT_EQ(before.size(), ref.size()) << name;
    int lowered = 0;
    for (size_t i = 0; i < load.size(); ++i) {
      EXPECT_LE(load[i], before[i]) << name << ", step " << i + 1;
      lowered += load[i] < before[i];
    }
    EXPECT_GT(lowered, 0) << name << ": no block moved in any step";
  }
}

TEST_F(ParallelTrain, DeepSeekStyleModelMatchesOneRank) {
  // Sigmoid router with its balance bias (a buffer updated from global expert counts), shared
  // expert, a dense first layer, tied embeddings; recomputation on.
  const std::string model =
      "--set model.family=deepseek_v3 --set model.router=sigmoid --set model.shared_experts=1 --set model.layers=3 "
      "--set model.dense_layers=1 --set model.router_groups=4 --set model.router_topk_groups=2 "
      "--set model.tie_embeddings=true --set train.steps=12 --set train.checkpointing=full ";
  const std::vector<double> ref = metric_losses(train("world1", 1, model));
  expect_parity(ref, metric_losses(train("zero3_ep2_x4", 4, model + "--set parallel.zero=3 --set parallel.ep=2")),
                "zero3_ep2_x4");
}

TEST_F(ParallelTrain, ShardedCheckpointResumesOnAnyLayout) {
  const std::string sets = "--set parallel.zero=3 --set parallel.ep=2 --set train.grad_accum=2 --set train.steps=8 ";
  const fs::path full = train("full", 2, sets + "--set train.save_every=4 --set train.keep_checkpoints=4");
  const fs::path ck = full / "checkpoints" / "step_0000004";
  ASSERT_TRUE(fs::exists(ck / "shards.json"));
  ASSERT_TRUE(fs::exists(ck / "shard-00001-of-00002.safetensors"));
  const fs::path resumed = train("resumed", 2, sets + "--resume " + ck.string());
  const std::vector<double> a = metric_losses(full), b = metric_losses(resumed);
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(b[i], a[4 + i]) << "step " << 5 + i;

  // Another layout (or one rank) reads the shards whole and keeps its part: the run goes on as the
  // original did, within the layouts' parity tolerance.
  for (const auto& [name, world, layout] : {std::tuple<const char*, int, const char*>{"one_rank", 1, "--set parallel.ep=1 --set parallel.zero=0"},
                                            {"zero1_ep4_x4", 4, "--set parallel.zero=1 --set parallel.ep=4"}}) {
    const fs::path rd = train(name, world,
                              "--set train.grad_accum=2 --set train.steps=8 " + std::string(layout) + " --resume " +
                                  ck.string());
    const std::vector<double> c = metric_losses(rd);
    ASSERT_EQ(c.size(), 4u) << name;
    for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(c[i], a[4 + i], 1e-6 * a[4 + i]) << name << " step " << 5 + i;
  }
  // The sharded checkpoint evaluates and exports like a single-rank one.
  {
    std::ofstream text(dir_ / "eval.txt");
    for (int i = 0; i < 40; ++i) text << "Once upon a time a small dog lived near the farm and liked seeds.\n\n";
  }
  test::MopResult ev = run_mop("eval --checkpoint " + ck.string() + " --data " + (dir_ / "eval.txt").string());
  EXPECT_EQ(ev.code, 0) << ev.out;
  EXPECT_NE(ev.out.find("eval_loss="), std::string::npos) << ev.out;
  const fs::path hf = dir_ / "hf";
  test::MopResult r = run_mop("export --checkpoint " + ck.string() + " --out " + hf.string());
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(hf / "model.safetensors")) << r.out;
}

TEST_F(ParallelTrain, ImpossibleLayoutsPrintTheNumbers) {
  test::MopResult r = run_mop("launch --nproc 2 -- train " + common_ + " --set parallel.ep=4 --set train.steps=1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("parallel.ep = 4 does not divide the world size 2"), std::string::npos) << r.out;
  r = run_mop("launch --nproc 2 -- train " + common_ + " --set train.batch=3 --set train.steps=1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("train.batch = 3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("over 2 data-parallel ranks"), std::string::npos) << r.out;
  r = run_mop("train " + common_ + " --set parallel.ep=3 --set train.steps=1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("parallel.ep = 3 must be >= 1 and divide model.experts = 8"), std::string::npos) << r.out;
  r = run_mop("train " + common_ + " --set parallel.ep_balance_max_guests=0 --set train.steps=1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("parallel.ep_balance_max_guests must be between 1 and model.experts = 8, got 0"),
            std::string::npos) << r.out;
}

// Ranks started directly (as mpirun or srun would: no `mop launch` watching them). Rank 1 is
// killed mid-run; rank 0 must stop with an error naming rank 1 within the timeout, not hang.
TEST_F(ParallelTrain, KilledRankEndsTheRunWithAnError) {
  const char* bin = std::getenv("MOP_BIN");
  const std::string port = std::to_string(20000 + ::getpid() % 20000);
  const fs::path log0 = dir_ / "rank0.log";
  pid_t pids[2] = {0, 0};
  struct Reaper {  // no test failure leaves a rank running
    pid_t* p;
    ~Reaper() {
      for (int r = 0; r < 2; ++r)
        if (p[r] > 0 && ::kill(p[r], SIGKILL) == 0) ::waitpid(p[r], nullptr, 0);
    }
  } reaper{pids};
  for (int r = 0; r < 2; ++r) {
    pids[r] = ::fork();
    ASSERT_GE(pids[r], 0);
    if (pids[r] == 0) {
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", "2", 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", port.c_str(), 1);
      if (r == 0) {
        FILE* f = std::freopen(log0.c_str(), "w", stdout);
        (void)f;
        ::dup2(::fileno(stdout), 2);
      } else {
        FILE* f = std::freopen("/dev/null", "w", stdout);
        (void)f;
      }
      const std::string rd = "run.dir=" + (dir_ / "run").string();
      ::execl(bin ? bin : "mop", "mop", "train", "--set", "device=cpu", "--set", "train.threads=1", "--set",
              "train.steps=100000", "--set", "train.log_every=1", "--set", "parallel.zero=3", "--set",
              "parallel.timeout_s=60", "--set", rd.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
  }
  // Let training start (rank 0 prints step lines), then kill rank 1.
  auto t0 = std::chrono::steady_clock::now();
  auto log_text = [&] {
    std::ifstream f(log0);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  while (log_text().find("2/100000") == std::string::npos &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_NE(log_text().find("2/100000"), std::string::npos) << log_text();
  ::kill(pids[1], SIGKILL);
  ::waitpid(pids[1], nullptr, 0);
  pids[1] = 0;
  const auto killed = std::chrono::steady_clock::now();
  int status = 0;
  pid_t done = 0;
  while ((done = ::waitpid(pids[0], &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() - killed < std::chrono::seconds(90))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (done == 0) FAIL() << "rank 0 still running 90 s after rank 1 died:\n" << log_text();
  pids[0] = 0;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << log_text();
  const std::string out = log_text();
  EXPECT_NE(out.find("error:"), std::string::npos) << out;
  EXPECT_NE(out.find("rank 1"), std::string::npos) << out;
  EXPECT_LT(secs, 65.0) << out;
}

}  // namespace
}  // namespace mop
