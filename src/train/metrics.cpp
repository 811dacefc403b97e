#include "train/metrics.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/strings.h"

namespace mop {

void MetricsLog::open(const std::string& path, bool append) {
  f_ = std::fopen(path.c_str(), append ? "ab" : "wb");
  MOP_CHECK(f_, "cannot open {} for writing", path);
}

MetricsLog::~MetricsLog() {
  if (f_) std::fclose(f_);
}

void MetricsLog::write(const StepMetrics& m) {
  if (!f_) return;
  nlohmann::json j;
  j["step"] = m.step;
  j["loss"] = m.loss;
  j["aux_loss"] = m.aux_loss;
  j["lr"] = m.lr;
  j["grad_norm"] = m.grad_norm;
  j["tokens_per_s"] = m.tokens_per_s;
  j["tflops"] = m.tflops;
  j["mfu"] = m.mfu;
  j["mem_gib"] = m.mem_gib;
  j["tokens"] = m.tokens;
  j["elapsed_s"] = m.elapsed_s;
  if (m.eval_loss) j["eval_loss"] = *m.eval_loss;
  if (m.ep_load > 0) {
    j["ep_load_max_over_mean"] = m.ep_load;
    j["ep_load_max_over_mean_unbalanced"] = m.ep_load_unbalanced;
    j["ep_guest_pairs"] = m.ep_guest_pairs;
  }
  if (!m.phase_ms.empty()) {
    nlohmann::json ph = nlohmann::json::object();
    for (const auto& [name, ms] : m.phase_ms) ph[name] = ms;
    j["phase_ms"] = ph;
  }
  std::string line = j.dump() + "\n";
  std::fwrite(line.data(), 1, line.size(), f_);
  std::fflush(f_);
}

std::string progress_line(const StepMetrics& m) {
  std::string s = fmt::format("step {:>{}}/{} | loss {:.4f} | aux {:.3f} | lr {:.2e} | gnorm {:.3f} | {} tok/s | mfu {:.2f}% | mem {:.2f} GiB | eta {}",
                              m.step, int(std::to_string(m.steps).size()), m.steps, m.loss, m.aux_loss, m.lr,
                              m.grad_norm, human_count(m.tokens_per_s), 100.0 * m.mfu, m.mem_gib,
                              human_seconds(m.eta_s));
  if (m.eval_loss) s += fmt::format(" | eval {:.4f}", *m.eval_loss);
  if (m.ep_load > 0) {
    s += fmt::format(" | ep load {:.2f}", m.ep_load);
    if (m.ep_load_unbalanced != m.ep_load) s += fmt::format(" (unbalanced {:.2f})", m.ep_load_unbalanced);
  }
  if (!m.phase_ms.empty()) {
    s += " | ms";
    for (const auto& [name, ms] : m.phase_ms) s += fmt::format(" {} {:.1f}", name, ms);
  }
  return s;
}

double peak_flops(double configured_tflops, bool gpu, int threads) {
  if (configured_tflops > 0) return configured_tflops * 1e12;
  if (gpu) return 790e12;
  return double(threads) * 3e9 * 32;
}

}  // namespace mop
