// `mop bench ops`: every CUDA kernel of the engine timed on one preset's shapes, against the
// copy-bandwidth and GEMM ceilings measured in the same run (and dense cuBLAS for the grouped
// GEMMs, the three plain GEMMs for the fused LM head + loss). Plain C++: the CLI includes it in
// every build; without the CUDA backend or a GPU, run_ops_bench throws a clear mop::Error.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mop::bench {

struct OpsBenchOptions {
  std::string preset = "moe-1b";
  int64_t seq = 4096;  // tokens per sequence (the attention's causal length)
  int64_t batch = 0;   // sequences; 0: the preset's benchmark batch (moe-1b 4, others 2)
  std::string json;    // one JSON object per kernel, one per line ("" = none)
  std::string only;    // comma-separated case groups to time (ops_group_names()); "" = all
};

// The case groups, in the order they run (the ceilings always run first).
const std::vector<std::string>& ops_group_names();
// Whether resolved options time group `g`.
bool ops_runs_group(const OpsBenchOptions& o, const std::string& g);

// Resolves the defaults and validates (unknown preset, sizes) without touching a GPU.
OpsBenchOptions resolve_ops_options(const OpsBenchOptions& o);

// Prints the table to stdout (and writes the JSON lines); returns the exit code.
int run_ops_bench(const OpsBenchOptions& o);

}  // namespace mop::bench
