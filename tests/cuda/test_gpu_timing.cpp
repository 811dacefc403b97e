// train.timing: the phases of a GPU step, measured with CUDA events, account for the step's time;
// train.trace: one step's timeline.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <map>

#include "core/error.h"
#include "cuda_check.h"
#include "train/cuda/step_trace.h"
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

// train.trace: the chosen step's timeline, with the device's kernels (the optimizer's among them)
// inside the step's wall time and the host's CUDA calls beside them. Without CUPTI in the build
// the same request is a clear error, not an empty file.
TEST(GpuTrace, TimelineOfOneStep) {
  MOP_REQUIRE_GPU();
  char tmpl[] = "/tmp/mop_gpu_trace_XXXXXX";
  const fs::path dir = mkdtemp(tmpl);
  const std::string path = (dir / "trace_{rank}.json").string();
  if (!StepTrace::available()) {
    try {
      run_tiny({"train.steps=3", "train.trace=" + path, "train.trace_step=2"});
      FAIL() << "train.trace ran without CUPTI";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("this build has no CUPTI"), std::string::npos) << e.what();
    }
    fs::remove_all(dir);
    return;
  }
  const TrainResult r = run_tiny({"train.steps=3", "train.trace=" + path, "train.trace_step=2"});
  std::ifstream f(dir / "trace_0.json");
  ASSERT_TRUE(f) << "no trace written";
  const nlohmann::json doc = nlohmann::json::parse(f);
  size_t kernels = 0, runtime = 0, adamw = 0, syncs = 0;
  double first = 1e300, last = 0;
  for (const auto& e : doc.at("traceEvents")) {
    if (e.at("ph") != "X") continue;
    const std::string cat = e.at("cat"), name = e.at("name");
    const double ts = e.at("ts"), dur = e.at("dur");
    EXPECT_GE(ts, 0.0);
    EXPECT_GE(dur, 0.0);
    if (cat == "runtime") {
      ++runtime;
      syncs += name.find("Synchronize") != std::string::npos;
      continue;
    }
    kernels += cat == "kernel";
    adamw += name.find("adamw") != std::string::npos;
    first = std::min(first, ts), last = std::max(last, ts + dur);
  }
  EXPECT_GT(kernels, 50u);
  EXPECT_GT(adamw, 0u) << "the step's optimizer kernels";
  EXPECT_GT(runtime, kernels) << "each launch is a runtime call";
  EXPECT_GT(syncs, 0u);
  EXPECT_EQ(doc.at("otherData").at("dropped_records"), 0);
  // One step, not more: the device's activity fits in the step's wall time.
  EXPECT_LE(last - first, 1e6 * r.step_seconds[1]) << "device span (us) against step 2's wall time";
  std::printf("trace of step 2: %zu kernels, %zu runtime calls, device span %.2f ms, step %.2f ms\n", kernels, runtime,
              (last - first) / 1e3, 1e3 * r.step_seconds[1]);
  fs::remove_all(dir);
}
