// The `mop` binary as users and scripts call it: exit codes, messages, the eval line, the
// frozen flag set, data preparation, export and import.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <algorithm>
#include <string>

namespace fs = std::filesystem;

#include "run_mop.h"

namespace {

using Result = mop::test::MopResult;
Result run(const std::string& args) { return mop::test::run_mop(args); }

std::string temp_dir() {
  char tmpl[] = "/tmp/mop_cli_XXXXXX";
  return mkdtemp(tmpl);
}

std::string last_line(const std::string& s) {
  std::string t = s;
  while (!t.empty() && t.back() == '\n') t.pop_back();
  size_t nl = t.rfind('\n');
  return nl == std::string::npos ? t : t.substr(nl + 1);
}

const std::string kFast =
    " --set train.seq_len=64 --set train.batch=2 --set data.builtin_docs=100 --set train.sample_tokens=0"
    " --set train.eval_every=0 --set train.threads=1";

}  // namespace

TEST(Cli, FlagSetIsFrozen) {
  // Adding a flag is a deliberate change: update this list with it. Everything else is a config key.
  Result r = run("train --help");
  EXPECT_EQ(r.code, 0);
  std::regex flag("--[a-z][a-z-]*");
  std::set<std::string> flags;
  for (std::sregex_iterator it(r.out.begin(), r.out.end(), flag), end; it != end; ++it) flags.insert(it->str());
  EXPECT_EQ(flags, (std::set<std::string>{"--config", "--help", "--init-from", "--resume", "--set"})) << r.out;
}

TEST(Cli, UnknownKeyIsOneClearError) {
  Result r = run("train --set train.lrr=1");
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(r.out, "error: unknown config key 'train.lrr' in --set (did you mean 'train.lr'?)\n");
  r = run("train --set model.top_k=20");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("model.top_k = 20 exceeds model.experts = 8"), std::string::npos) << r.out;
  r = run("train --set device=cpu --set train.trace=t.json");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("train.trace records GPU activity: it needs device = cuda (device resolved to cpu)"),
            std::string::npos)
      << r.out;
  r = run("train --config /nonexistent.toml");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("/nonexistent.toml"), std::string::npos) << r.out;
}

TEST(Cli, TrainEvalExportImport) {
  const std::string dir = temp_dir();
  Result r = run("train --set train.steps=4 --set run.dir=" + dir + "/run" + kFast);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("step 4/4 | loss"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tok/s | mfu"), std::string::npos) << r.out;

  // A small text file to evaluate on.
  {
    std::ofstream f(dir + "/eval.txt");
    for (int i = 0; i < 20; ++i) f << "The fox saw the cat near the river. The cat ran home.\n\n";
  }
  r = run("eval --checkpoint " + dir + "/run --data " + dir + "/eval.txt");
  ASSERT_EQ(r.code, 0) << r.out;
  std::smatch m;
  std::string last = last_line(r.out);
  ASSERT_TRUE(std::regex_match(last, m, std::regex("eval_loss=([0-9.]+) tokens=([0-9]+)"))) << last;
  const std::string loss = m[1];

  r = run("export --checkpoint " + dir + "/run --out " + dir + "/hf");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(dir + "/hf/config.json"));
  EXPECT_TRUE(fs::exists(dir + "/hf/model.safetensors"));
  std::ifstream cj(dir + "/hf/config.json");
  std::string config((std::istreambuf_iterator<char>(cj)), {});
  EXPECT_NE(config.find("\"Qwen3MoeForCausalLM\""), std::string::npos);

  r = run("import --hf " + dir + "/hf --out " + dir + "/imported --set train.seq_len=64 --set train.batch=2");
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("eval --checkpoint " + dir + "/imported --data " + dir + "/eval.txt");
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_TRUE(std::regex_match(last = last_line(r.out), m, std::regex("eval_loss=([0-9.]+) tokens=([0-9]+)")));
  EXPECT_EQ(m[1], loss) << "the imported model evaluates differently";
  fs::remove_all(dir);
}

TEST(Cli, PrepareTrainOnShardsAndCorruptShards) {
  const std::string dir = temp_dir();
  {
    std::ofstream f(dir + "/a.txt");
    for (int i = 0; i < 200; ++i) f << "Document number " << i << " talks about foxes and rivers.\n\n";
  }
  Result r = run("data prepare --input " + dir + "/a.txt --out " + dir + "/shards --val-fraction 0.1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(dir + "/shards/train_000000.bin"));
  r = run("train --set train.steps=2 --set data.path=" + dir + "/shards --set run.dir=" + dir + "/run" + kFast);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("held-out tokens"), std::string::npos) << r.out;

  // Truncate a shard: a clear error naming the file, not a crash.
  fs::resize_file(dir + "/shards/train_000000.bin", fs::file_size(dir + "/shards/train_000000.bin") - 3);
  r = run("train --set train.steps=2 --set data.path=" + dir + "/shards --set run.dir=" + dir + "/run2" + kFast);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("train_000000.bin"), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << "one line, no stack dump: " << r.out;
  fs::remove_all(dir);
}

TEST(Cli, ResumeContinuesTheRun) {
  const std::string dir = temp_dir();
  Result r = run("train --set train.steps=3 --set run.dir=" + dir + "/run" + kFast);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("train --resume " + dir + "/run --set train.steps=5");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("step 5/5"), std::string::npos) << r.out;
  std::ifstream f(dir + "/run/metrics.jsonl");
  int lines = 0;
  for (std::string l; std::getline(f, l);) ++lines;
  EXPECT_EQ(lines, 5);
  fs::remove_all(dir);
}
