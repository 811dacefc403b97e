// train.timing: the phases of a GPU step, measured with CUDA events, account for the step's time.
#include <filesystem>
#include <map>

#include "cuda_check.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace mop;

namespace {

TrainResult run_tiny(std::vector<std::string> extra) {
  char tmpl[] = "/tmp/mop_gpu_timing_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  std::vector<std::string> sets = {"device=cuda",          "train.steps=8",         "train.seq_len=256",
                                   "train.batch=8",        "train.eval_every=0",    "train.sample_tokens=0",
                                   "data.builtin_docs=400", "run.dir=" + dir};
  sets.insert(sets.end(), extra.begin(), extra.end());
  Trainer t(load_config("", parse_overrides(sets)), TrainOptions{"", "", true, true});
  TrainResult r = t.run();
  fs::remove_all(dir);
  return r;
}

}  // namespace

TEST(GpuTiming, PhasesAccountForTheStep) {
  MOP_REQUIRE_GPU();
  EXPECT_TRUE(run_tiny({}).phase_ms.empty()) << "timing is off by default";

  const TrainResult r = run_tiny({"train.timing=true", "train.checkpointing=selective", "train.grad_accum=2"});
  ASSERT_EQ(r.phase_ms.size(), r.step_seconds.size());
  for (size_t s = 0; s < r.phase_ms.size(); ++s) {
    std::map<std::string, double> ph(r.phase_ms[s].begin(), r.phase_ms[s].end());
    for (const char* name : {"host", "zero_grads", "forward", "moe_sync", "head", "recompute", "backward",
                             "reduce_wait", "grad_norm", "update"})
      EXPECT_TRUE(ph.count(name)) << "step " << s + 1 << " has no phase " << name;
    double sum = 0;
    for (const auto& [name, ms] : ph) {
      EXPECT_GE(ms, 0.0) << name;
      sum += ms;
    }
    EXPECT_GT(ph["forward"] + ph["backward"] + ph["head"], 0.0);
    // From the second step on, the phases cover the span from the previous step's last mark to
    // this step's: the step's wall time give or take the host's logging between steps.
    if (s == 0) continue;
    const double wall_ms = 1e3 * r.step_seconds[s];
    EXPECT_NEAR(sum, wall_ms, 0.25 * wall_ms + 3.0) << "step " << s + 1;
    std::printf("step %zu: wall %.2f ms, phases %.2f ms (forward %.2f, backward %.2f, update %.2f)\n", s + 1,
                wall_ms, sum, ph["forward"], ph["backward"], ph["update"]);
  }
}
