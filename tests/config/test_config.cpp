#include <gtest/gtest.h>

#include <functional>

#include "core/error.h"
#include "train/config.h"

using namespace mop;

namespace {
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Config, DefaultsAreTheTinyPreset) {
  Config c = load_config("", {});
  EXPECT_EQ(c.model.preset, "tiny");
  EXPECT_EQ(c.model.hidden, 64);
  EXPECT_EQ(c.run_dir(), "runs/tiny");
  EXPECT_EQ(c.device, "auto");
}

TEST(Config, FileThenOverrides) {
  Config c = parse_config_text("device = \"cpu\"\n[train]\nlr = 0.01\nsteps = 5\n[model]\npreset = \"moe-1b\"\nlayers = 3\n",
                               "test.toml", parse_overrides({"train.steps=7", "run.name=exp1", "model.qk_norm=false"}));
  EXPECT_EQ(c.device, "cpu");
  EXPECT_DOUBLE_EQ(c.train.lr, 0.01);
  EXPECT_EQ(c.train.steps, 7);
  EXPECT_EQ(c.model.hidden, 1024);  // from the preset
  EXPECT_EQ(c.model.layers, 3);     // explicit key beats the preset whatever the order
  EXPECT_FALSE(c.model.qk_norm);
  EXPECT_EQ(c.run_dir(), "runs/exp1");
}


TEST(Config, UnknownKeyMessages) {
  std::string m = error_of([] { parse_config_text("[train]\nlrr = 1\n", "x.toml", {}); });
  EXPECT_NE(m.find("unknown config key 'train.lrr' in x.toml (did you mean 'train.lr'?)"), std::string::npos) << m;
  m = error_of([] { parse_config_text("", "x.toml", parse_overrides({"train.step=3"})); });
  EXPECT_NE(m.find("did you mean 'train.steps'?"), std::string::npos) << m;
  m = error_of([] { parse_config_text("", "x.toml", parse_overrides({"model.presett=tiny"})); });
  EXPECT_NE(m.find("model.preset"), std::string::npos) << m;
  m = error_of([] { parse_config_text("", "x.toml", parse_overrides({"model.preset=moe-2b"})); });
  EXPECT_NE(m.find("unknown model preset 'moe-2b'"), std::string::npos) << m;
}

TEST(Config, BadValuesNameTheValues) {
  auto err = [](std::vector<std::string> sets) { return error_of([&] { load_config("", parse_overrides(sets)); }); };
  EXPECT_NE(err({"model.top_k=9"}).find("model.top_k = 9 exceeds model.experts = 8"), std::string::npos);
  EXPECT_NE(err({"model.head_dim=0", "model.heads=3"}).find("model.heads = 3 does not divide model.hidden = 64"),
            std::string::npos);
  EXPECT_NE(err({"train.lr=abc"}).find("train.lr: expected a number"), std::string::npos);
  EXPECT_NE(err({"train.schedule=cosin"}).find("train.schedule = 'cosin' is not one of"), std::string::npos);
  EXPECT_NE(err({"device=tpu"}).find("device = 'tpu'"), std::string::npos);
  EXPECT_NE(err({"parallel.gpu_comm=mpi"}).find("parallel.gpu_comm must be 'nccl', 'host' or 'skip', got 'mpi'"),
            std::string::npos);
  EXPECT_NE(err({"trainlr"}).find("--set expects key=value"), std::string::npos);
  EXPECT_NE(err({"train.trace=t.json", "train.steps=5", "train.trace_step=6"})
                .find("train.trace_step = 6 is not a step of the run (1..train.steps = 5, or 0 for the last)"),
            std::string::npos);
  std::string m = error_of([] { parse_config_text("[train\nlr=1", "bad.toml", {}); });
  EXPECT_NE(m.find("bad.toml: invalid TOML at line 1"), std::string::npos) << m;
}

TEST(Config, ResolvedTomlRoundTrips) {
  Config a = load_config("", parse_overrides({"model.preset=moe-1b", "model.layers=5", "train.lr=0.00025",
                                              "run.dir=/tmp/x y", "train.seed=18446744073709551"}));
  Config b = parse_config_text(a.to_toml(), "resolved", {});
  EXPECT_EQ(a.to_toml(), b.to_toml());
  EXPECT_EQ(b.model.layers, 5);
  EXPECT_EQ(b.run.dir, "/tmp/x y");
  EXPECT_DOUBLE_EQ(b.train.lr, 0.00025);
}

TEST(Config, EveryKeyIsDocumented) {
  std::string ref = config_reference();
  for (const auto& k : config_keys()) EXPECT_NE(ref.find(k + " = "), std::string::npos) << k;
  EXPECT_GT(config_keys().size(), 50u);
}
