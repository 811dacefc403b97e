// Launching: rank discovery from every launcher's environment, and `mop launch` stopping all ranks
// when one fails.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>

#include "core/error.h"
#include "parallel/launch.h"

using namespace mop;

#include "run_mop.h"

namespace {

RankInfo detect(std::map<std::string, std::string> env) {
  return detect_rank([&](const char* k) -> const char* {
    auto it = env.find(k);
    return it == env.end() ? nullptr : it->second.c_str();
  });
}

using CmdResult = mop::test::MopResult;
CmdResult run(const std::string& args) { return mop::test::run_mop(args); }

}  // namespace

TEST(RankEnv, EveryLauncher) {
  RankInfo none = detect({});
  EXPECT_EQ(none.rank, 0);
  EXPECT_EQ(none.world, 1);
  EXPECT_EQ(none.launcher, "none");

  RankInfo t = detect({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "n0"},
                       {"MASTER_PORT", "29500"}});
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.world, 8);
  EXPECT_EQ(t.local_rank, 1);
  EXPECT_EQ(t.launcher, "torchrun");
  EXPECT_EQ(t.master_addr, "n0");
  EXPECT_EQ(t.master_port, 29500);

  RankInfo m = detect({{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "16"},
                       {"OMPI_COMM_WORLD_LOCAL_RANK", "5"}});
  EXPECT_EQ(m.rank, 5);
  EXPECT_EQ(m.world, 16);
  EXPECT_EQ(m.launcher, "mpirun");

  RankInfo s = detect({{"SLURM_PROCID", "9"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "1"}});
  EXPECT_EQ(s.rank, 9);
  EXPECT_EQ(s.local_rank, 1);
  EXPECT_EQ(s.launcher, "srun");
}

TEST(RankEnv, BadValuesNameTheVariable) {
  try {
    detect({{"RANK", "4"}, {"WORLD_SIZE", "4"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank 4 is outside world size 4"), std::string::npos) << e.what();
  }
  try {
    detect({{"RANK", "x"}, {"WORLD_SIZE", "4"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("RANK=x"), std::string::npos) << e.what();
  }
}

TEST(Launch, StartsEveryRankWithItsEnvironment) {
  CmdResult r = run("launch --nproc 3 -- rank-info");
  ASSERT_EQ(r.code, 0) << r.out;
  for (int k = 0; k < 3; ++k)
    EXPECT_NE(r.out.find("\"launcher\":\"mop\",\"local_rank\":" + std::to_string(k)), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"world\":3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"master_addr\":\"127.0.0.1\""), std::string::npos) << r.out;
}

TEST(Launch, OneFailingRankStopsTheOthers) {
  // Rank 1 exits with code 1; ranks 0 and 2 would sleep 60 s: the launcher must stop them.
  CmdResult r = run("launch --nproc 3 -- rank-info --fail-on-rank 1");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("rank 1 exited with code 1; stopping the other ranks"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("error: rank 1 of 3 failed (exit code 1)"), std::string::npos) << r.out;
  EXPECT_LT(r.seconds, 20.0);
}

TEST(Launch, NeedsASubcommand) {
  CmdResult r = run("launch --nproc 2");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("needs a subcommand after --"), std::string::npos) << r.out;
}
