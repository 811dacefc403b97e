// End to end on the CPU: the loss falls, resume is bit-exact, checkpoints round-trip,
// recomputation and gradient accumulation keep the math, out-of-memory is reported.
#include <gtest/gtest.h>

#include <filesystem>
#include <cstring>
#include <fstream>

#include "checkpoint/checkpoint.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace mop;

namespace {

std::string temp_dir() {
  char tmpl[] = "/tmp/mop_train_XXXXXX";
  return mkdtemp(tmpl);
}

// A small fast run of the tiny preset on the built-in corpus.
Config small_config(const std::string& dir, std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = {"train.steps=8",       "train.seq_len=64",   "train.batch=4",
                                   "train.warmup=2",      "train.eval_every=0", "train.sample_tokens=0",
                                   "data.builtin_docs=200", "train.threads=1",   "run.dir=" + dir};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config("", parse_overrides(sets));
}

std::vector<double> train(const Config& c, const std::string& resume = "") {
  Trainer t(c, TrainOptions{resume, "", true});
  return t.run().losses;
}

}  // namespace

TEST(Trainer, LossFallsOnTheBuiltinCorpus) {
  const std::string dir = temp_dir();
  Trainer t(small_config(dir, {"train.steps=60", "train.lr=0.01"}), TrainOptions{"", "", true});
  TrainResult r = t.run();
  ASSERT_EQ(r.losses.size(), 60u);
  double last = 0;
  for (size_t i = 50; i < 60; ++i) last += r.losses[i] / 10;
  EXPECT_GT(r.losses.front(), 5.0);  // ~log(259) at init
  EXPECT_LT(last, r.unigram_entropy) << "first " << r.losses.front() << " last " << last;
  // metrics.jsonl: one object per step with the documented fields.
  std::ifstream f(fs::path(dir) / "metrics.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    ++n;
    for (const char* key : {"\"step\"", "\"loss\"", "\"lr\"", "\"grad_norm\"", "\"tokens_per_s\"", "\"mfu\"", "\"mem_gib\""})
      EXPECT_NE(line.find(key), std::string::npos) << key << " missing in " << line;
  }
  EXPECT_EQ(n, 60);
  EXPECT_TRUE(fs::exists(fs::path(dir) / "config.toml"));
  EXPECT_TRUE(fs::exists(fs::path(dir) / "checkpoints" / "latest"));
  fs::remove_all(dir);
}

TEST(Trainer, SameSeedSameLossesBitForBit) {
  const std::string a = temp_dir(), b = temp_dir();
  EXPECT_EQ(train(small_config(a)), train(small_config(b)));
  std::vector<double> other = train(small_config(b, {"train.seed=99"}));
  EXPECT_NE(train(small_config(a)), other);
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(Trainer, ResumeIsBitExact) {
  const std::string a = temp_dir(), b = temp_dir();
  // Uninterrupted: 8 steps, checkpoints every 4.
  std::vector<double> full = train(small_config(a, {"train.save_every=4", "train.grad_accum=2"}));
  ASSERT_EQ(full.size(), 8u);
  // Resume from the step-4 checkpoint into another run directory.
  const std::string ck = (fs::path(a) / "checkpoints" / "step_0000004").string();
  ASSERT_TRUE(fs::exists(ck));
  Config rc = checkpoint_config(ck, parse_overrides({"run.dir=" + b}));
  std::vector<double> rest = train(rc, ck);
  ASSERT_EQ(rest.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(rest[i], full[4 + i]) << "step " << 5 + i;
  // The final weights agree too.
  ParamTable t = build_param_table(rc.model);
  std::vector<float> pa(size_t(t.total)), pb(size_t(t.total));
  load_checkpoint(resolve_checkpoint(a), t, pa.data(), nullptr, nullptr);
  load_checkpoint(resolve_checkpoint(b), t, pb.data(), nullptr, nullptr);
  EXPECT_EQ(pa, pb);
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(Trainer, RecomputationKeepsLossesBitIdentical) {
  const std::string a = temp_dir(), b = temp_dir();
  EXPECT_EQ(train(small_config(a)), train(small_config(b, {"train.checkpointing=full"})));
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(Trainer, GradientAccumulationMatchesOneLargeBatch) {
  const std::string a = temp_dir(), b = temp_dir();
  std::vector<double> one = train(small_config(a, {"train.batch=4", "train.grad_accum=1", "model.lb_coef=0"}));
  std::vector<double> acc = train(small_config(b, {"train.batch=2", "train.grad_accum=2", "model.lb_coef=0"}));
  ASSERT_EQ(one.size(), acc.size());
  // Same tokens, same objective; only the fp32 summation order differs.
  for (size_t i = 0; i < one.size(); ++i) EXPECT_NEAR(one[i], acc[i], 2e-4 * one[i]) << "step " << i + 1;
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(Trainer, CheckpointRoundTripsWeightsMomentsAndState) {
  const std::string dir = temp_dir();
  Config c = small_config(dir, {"train.steps=2"});
  ParamTable t = build_param_table(c.model);
  std::vector<float> p(size_t(t.total)), g(size_t(t.total));
  init_params(t, p.data(), 3);
  for (size_t i = 0; i < g.size(); ++i) g[i] = float(i % 7) * 1e-3f;
  AdamW opt(t, OptimizerSettings{});
  opt.step(p.data(), g.data(), 1e-3);
  TrainState st;
  st.step = 17, st.rng_state = 0xfedcba9876543210ull, st.cursor = {2, 5}, st.tokens_seen = 1234;
  save_checkpoint(dir + "/ck", c, t, p.data(), &opt, &st);
  std::vector<float> p2(size_t(t.total));
  AdamW opt2(t, OptimizerSettings{});
  TrainState st2;
  load_checkpoint(dir + "/ck", t, p2.data(), &opt2, &st2);
  EXPECT_EQ(p, p2);
  EXPECT_EQ(0, std::memcmp(opt.m(), opt2.m(), sizeof(float) * size_t(t.total)));
  EXPECT_EQ(0, std::memcmp(opt.v(), opt2.v(), sizeof(float) * size_t(t.total)));
  EXPECT_EQ(opt2.steps_taken(), 1);
  EXPECT_EQ(st2.step, 17);
  EXPECT_EQ(st2.rng_state, st.rng_state);
  EXPECT_EQ(st2.cursor, st.cursor);
  EXPECT_EQ(st2.tokens_seen, 1234);
  fs::remove_all(dir);
}

TEST(Trainer, OutOfMemoryReportsTheBreakdown) {
  const std::string dir = temp_dir();
  try {
    train(small_config(dir, {"run.memory_limit_gib=0.002"}));
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("out of cpu memory"), std::string::npos) << m;
    EXPECT_NE(m.find("params"), std::string::npos) << m;
    EXPECT_NE(m.find("would have fitted"), std::string::npos) << m;
  }
  memory_tracker(Device::cpu).set_limit(0);
  fs::remove_all(dir);
}
