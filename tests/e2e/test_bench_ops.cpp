// `mop bench ops` as CI sees it (no GPU): arguments are validated first, then a build without the
// CUDA backend or a machine without a GPU gets one clear line and exit code 2. The benchmark
// itself runs on the accelerator machine (bench/results/*-ops.md).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <regex>
#include <set>
#include <string>

#ifdef MOP_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "run_mop.h"

namespace {

using Result = mop::test::MopResult;
Result run(const std::string& args) { return mop::test::run_mop(args); }

std::set<std::string> flags_of(const std::string& help) {
  std::regex flag("--[a-z][a-z-]*");
  std::set<std::string> flags;
  for (std::sregex_iterator it(help.begin(), help.end(), flag), end; it != end; ++it) flags.insert(it->str());
  return flags;
}

// The runtime asked directly: the engine's helper would pull the CUDA library into this binary.
bool have_gpu() {
#ifdef MOP_HAVE_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

}  // namespace

TEST(BenchOps, WithoutGpuFailsWithOneClearLine) {
  if (have_gpu()) GTEST_SKIP() << "a GPU is present: the benchmark would run (see bench/results)";
  const Result r = run("bench ops --preset moe-1b");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_EQ(r.out.rfind("error: mop bench ops needs ", 0), 0u) << r.out;
  EXPECT_TRUE(r.out.find("CUDA backend") != std::string::npos || r.out.find("GPU") != std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << "one line, no stack dump: " << r.out;
}

TEST(BenchOps, ArgumentsAreCheckedBeforeTheDevice) {
  Result r = run("bench ops --preset moe-2b");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("unknown model preset 'moe-2b'"), std::string::npos) << r.out;
  r = run("bench ops --seq 0");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("must be positive"), std::string::npos) << r.out;
  r = run("bench ops --only grouped,atention");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--only: unknown group 'atention' (did you mean 'attention'?)"), std::string::npos) << r.out;
}

TEST(BenchOps, FlagSetsAreFrozen) {
  // `mop bench ops` adds a subcommand; the end-to-end `mop bench` keeps its flags.
  Result r = run("bench ops --help");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(flags_of(r.out), (std::set<std::string>{"--batch", "--help", "--json", "--only", "--preset", "--seq"})) << r.out;
  r = run("bench --help");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(flags_of(r.out), (std::set<std::string>{"--config", "--help", "--set", "--skip-steps", "--steps", "--warmup"})) << r.out;
  EXPECT_NE(r.out.find("ops"), std::string::npos) << r.out;
}

// The steps without communication replay the GPU decoder's routing: the CPU backend refuses them
// before training.
TEST(BenchOps, SkipStepsAreForTheGpu) {
  const Result r = run("bench --set device=cpu --set model.preset=tiny --steps 2 --warmup 1 --skip-steps 1");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("steps with the communication skipped are for GPU benchmarks"), std::string::npos) << r.out;
}
