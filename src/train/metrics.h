// What a run reports: one JSON object per optimizer step in metrics.jsonl, and a progress line.
#pragma once
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace mop {

struct StepMetrics {
  int64_t step = 0;           // 1-based: optimizer steps completed
  int64_t steps = 0;          // planned
  double loss = 0;            // mean token cross-entropy of the step's batch (nats)
  double aux_loss = 0;        // load-balancing loss, mean over MoE layers and micro-batches
  double lr = 0;
  double grad_norm = 0;       // global, before clipping
  double tokens_per_s = 0;
  double tflops = 0;          // model TFLOP/s (DESIGN.md's MFU numerator)
  double mfu = 0;             // fraction of peak
  double mem_gib = 0;         // peak tracked memory so far
  int64_t tokens = 0;         // tokens seen so far
  double elapsed_s = 0;
  double eta_s = 0;
  std::optional<double> eval_loss;
  std::vector<std::pair<std::string, double>> phase_ms;  // train.timing: GPU step phases (ms)
  // GPU expert parallelism: the MoE layers' largest rank load over the mean rank load, summed over
  // the step's layers (1 = even; the lighter ranks wait at each exchange for the rest), with
  // parallel.ep_balance's moves and without them, and this rank's pairs computed as a guest.
  // 0: not expert parallel.
  double ep_load = 0, ep_load_unbalanced = 0;
  int64_t ep_guest_pairs = 0;
};

class MetricsLog {
 public:
  MetricsLog() = default;
  // append: continue an existing file (resume) instead of truncating it.
  void open(const std::string& path, bool append);
  ~MetricsLog();
  void write(const StepMetrics& m);

 private:
  FILE* f_ = nullptr;
};

std::string progress_line(const StepMetrics& m);
// MFU denominator in FLOP/s: configured, else 790 TFLOP/s on a GPU, else an estimate for this
// CPU (threads x 3 GHz x 32 fp32 FLOP/cycle with AVX2 FMA).
double peak_flops(double configured_tflops, bool gpu, int threads);

}  // namespace mop
