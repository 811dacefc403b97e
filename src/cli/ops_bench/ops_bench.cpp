#include "cli/ops_bench/ops_bench.h"

#include <algorithm>
#include <fstream>

#include <fmt/ranges.h>

#include "core/error.h"
#include "core/strings.h"
#include "model/config.h"

#ifdef MOP_HAVE_CUDA
#include "cli/ops_bench/cuda/ops_cases.h"
#include "ops/cuda/runtime.h"
#endif

namespace mop::bench {

namespace {

std::vector<std::string> comma_list(const std::string& s) {
  std::vector<std::string> v;
  for (size_t b = 0; b <= s.size() && !s.empty();) {
    const size_t e = std::min(s.find(',', b), s.size());
    v.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return v;
}

}  // namespace

const std::vector<std::string>& ops_group_names() {
  static const std::vector<std::string> names{"memory", "gemm", "grouped", "attention", "head"};
  return names;
}

bool ops_runs_group(const OpsBenchOptions& o, const std::string& g) {
  if (o.only.empty()) return true;
  for (const std::string& w : comma_list(o.only))
    if (w == g) return true;
  return false;
}

OpsBenchOptions resolve_ops_options(const OpsBenchOptions& in) {
  OpsBenchOptions o = in;
  for (const std::string& w : comma_list(o.only)) {
    const std::vector<std::string>& names = ops_group_names();
    MOP_CHECK(std::find(names.begin(), names.end(), w) != names.end(), "--only: unknown group '{}'{}; groups: {}", w,
              did_you_mean(w, names), fmt::join(names, ", "));
  }
  const ModelConfig c = model_preset(o.preset);  // throws on an unknown name, suggesting the nearest
  c.validate();
  if (o.batch == 0) o.batch = o.preset == "moe-1b" ? 4 : 2;
  MOP_CHECK(o.seq > 0 && o.batch > 0, "--seq ({}) and --batch ({}) must be positive", o.seq, o.batch);
  // The ops take int row counts; the expert buffers hold tokens x top_k rows.
  MOP_CHECK(o.seq * o.batch * c.top_k < (int64_t(1) << 31), "--seq {} x --batch {} x top_k {} rows overflow int", o.seq,
            o.batch, c.top_k);
  return o;
}

int run_ops_bench(const OpsBenchOptions& in) {
  const OpsBenchOptions o = resolve_ops_options(in);
#ifdef MOP_HAVE_CUDA
  MOP_CHECK(cuda::device_count() > 0, "mop bench ops needs a GPU: no CUDA device is visible to this process");
  if (!o.json.empty()) {
    std::ofstream probe(o.json, std::ios::app);  // fail now, not after a minute of timing
    MOP_CHECK(probe.good(), "cannot write --json file '{}'", o.json);
  }
  return run_ops_cases(o);
#else
  MOP_FAIL(
      "mop bench ops needs the CUDA backend, and this build has none (it needs nvcc, cuDNN, the cuDNN "
      "frontend and CUTLASS: tools/fetch_headers.sh)");
#endif
}

}  // namespace mop::bench
