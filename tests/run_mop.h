// Running the mop binary from a test, as a user would: the path comes from MOP_BIN (CTest sets
// it), stdout and stderr are captured together.
#pragma once
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace mop::test {

struct MopResult {
  int code;            // exit status; -1 when killed by a signal
  std::string out;     // stdout and stderr together
  double seconds = 0;  // wall time
};

// env: assignments put before the command ("NAME=value ..."), for this run only.
inline MopResult run_mop(const std::string& args, const std::string& env = "") {
  const char* bin = std::getenv("MOP_BIN");
  const auto t0 = std::chrono::steady_clock::now();
  FILE* p = popen((env + (env.empty() ? "" : " ") + std::string(bin ? bin : "mop") + " " + args + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out, s};
}

// The per-step losses a run wrote to run_dir/metrics.jsonl.
// One field of every line of a run's metrics.jsonl ("loss", "grad_norm", ...).
inline std::vector<double> metric_values(const std::filesystem::path& run_dir, const std::string& key) {
  std::ifstream f(run_dir / "metrics.jsonl");
  std::vector<double> v;
  for (std::string line; std::getline(f, line);) v.push_back(nlohmann::json::parse(line).at(key).get<double>());
  return v;
}
inline std::vector<double> metric_losses(const std::filesystem::path& run_dir) {
  return metric_values(run_dir, "loss");
}

}  // namespace mop::test
