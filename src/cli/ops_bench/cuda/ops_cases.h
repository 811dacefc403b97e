// Internal to `mop bench ops`: the shared context, the result rows and the case groups
// (one file each: memory-bound ops, GEMMs, attention, LM head + loss).
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <string>

#include "ops/cuda/event_timer.h"
#include "cli/ops_bench/cuda/fill.h"
#include "cli/ops_bench/ops_bench.h"
#include "core/alloc.h"
#include "model/config.h"

namespace mop::bench {

using cuda::median_ms;
using cuda::time_events;
using cuda::Timing;
using cuda::TimingOptions;

int run_ops_cases(const OpsBenchOptions& o);

// One timed kernel. rate = bytes / time (memory-bound) or flops / time; ratio compares it with
// `ratio_to` (higher is better) unless time_ratio is set (then ratio = time / reference time,
// lower is better). target: the bar for the ratio (0: none).
struct Record {
  std::string group, kernel, shape;
  Timing t;
  double bytes = 0, flops = 0;
  double ratio = 0, target = 0;
  bool time_ratio = false;
  std::string ratio_to;
  std::string note;
  double extra_gib = -1, extra_gib_max = 0;  // device memory the kernel allocates, and its bar (0: none)
  double gbs() const { return bytes > 0 ? bytes / (t.median_ms * 1e6) : 0; }
  double tflops() const { return flops > 0 ? flops / (t.median_ms * 1e9) : 0; }
  bool has_target() const { return target > 0 || extra_gib_max > 0; }
  bool meets() const {
    const bool rate_ok = target <= 0 || (time_ratio ? ratio <= target : ratio >= target);
    return rate_ok && (extra_gib_max <= 0 || extra_gib <= extra_gib_max);
  }
};

struct Ceilings {
  double copy_gbs = 0;     // device-to-device cudaMemcpyAsync, bytes read + written
  double gemm_tflops = 0;  // cuBLASLt bf16 GEMM 8192^3 on random data
};

// Typed device array, accounted by the memory tracker (so the head's extra memory is measured
// by the same tracker the engine reports), filled with random values unless asked not to.
template <class T>
struct Dev {
  Buffer buf;
  size_t n = 0;
  Dev() = default;
  Dev(size_t count, Mem cat = Mem::workspace)
      : buf(Device::cuda, cat, std::max<size_t>(count, 1) * sizeof(T)), n(count) {}
  T* p() const { return buf.as<T>(); }
  size_t bytes() const { return n * sizeof(T); }
};

template <class T>
Dev<T> random_dev(size_t n, uint64_t seed, float lo, float hi, cudaStream_t st) {
  Dev<T> d(n);
  fill_uniform(d.p(), n, seed, lo, hi, st);
  return d;
}

struct Ctx {
  ModelConfig c;
  OpsBenchOptions o;
  int N = 0;  // tokens of the micro-batch (seq x batch)
  cudaStream_t st = nullptr;
  TimingOptions timing;  // every case: warm-up, median of samples, L2 flushed before each sample
  Ceilings ceil;
  std::deque<Record> rows;  // a deque: references returned by time() stay valid

  // Times f with `timing`, adds a row and returns it (for derived ratios).
  template <class F>
  Record& time(const std::string& group, const std::string& kernel, const std::string& shape, F&& f);
  Record& memory_row(Record& r, double bytes);  // sets bytes and the ratio to the copy ceiling
  Record& flop_row(Record& r, double flops);    // sets flops and the ratio to the GEMM ceiling
};

// Sets the sample count for a scope (long kernels need fewer samples for a stable median).
class SamplesScope {
 public:
  SamplesScope(Ctx& x, int samples) : x_(x), saved_(x.timing.samples) { x.timing.samples = samples; }
  ~SamplesScope() { x_.timing.samples = saved_; }
  SamplesScope(const SamplesScope&) = delete;
  SamplesScope& operator=(const SamplesScope&) = delete;

 private:
  Ctx& x_;
  int saved_;
};

template <class F>
Record& Ctx::time(const std::string& group, const std::string& kernel, const std::string& shape, F&& f) {
  Record r;
  r.group = group, r.kernel = kernel, r.shape = shape;
  r.t = time_events(f, st, timing);
  rows.push_back(r);
  return rows.back();
}

void bench_memory_ops(Ctx& x);
void bench_gemms(Ctx& x);
void bench_grouped(Ctx& x);
void bench_attention(Ctx& x);
void bench_head(Ctx& x);

// Report: the human table (stdout) and one JSON object per row.
void print_table(const Ctx& x);
void write_json(const Ctx& x, const std::string& path);

}  // namespace mop::bench
