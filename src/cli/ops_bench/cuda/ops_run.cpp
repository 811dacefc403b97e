// `mop bench ops` driver: ceilings first (same run, same card state), then every case group,
// then the table and the JSON lines.
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/ops_bench/cuda/fill.h"
#include "cli/ops_bench/cuda/ops_cases.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/matmul.h"
#include "ops/cuda/runtime.h"

namespace mop::bench {

Record& Ctx::memory_row(Record& r, double bytes) {
  r.bytes = bytes;
  r.ratio = r.gbs() / ceil.copy_gbs;
  r.ratio_to = "copy BW";
  r.target = 0.70;
  return r;
}

Record& Ctx::flop_row(Record& r, double flops) {
  r.flops = flops;
  r.ratio = r.tflops() / ceil.gemm_tflops;
  r.ratio_to = "GEMM 8192^3";
  return r;
}

namespace {

std::string versions() {
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  return fmt::format("CUDA runtime {}.{}, driver {}.{}, cuBLASLt {}, cuDNN {}", rt / 1000, rt % 1000 / 10, drv / 1000,
                     drv % 1000 / 10, cublasLtGetVersion(), cudnnGetVersion());
}

void measure_ceilings(Ctx& x) {
  // Copy: 2 GiB each way, far past the 60 MB L2; bytes counted read + written.
  SamplesScope samples(x, 10);  // 1 ms calls
  const size_t bytes = size_t(2) << 30;
  {
    Dev<char> a(bytes), b(bytes);
    auto copy = [&] { MOP_CUDA_CHECK(cudaMemcpyAsync(b.p(), a.p(), bytes, cudaMemcpyDeviceToDevice, x.st)); };
    Record& r = x.time("ceiling", "copy D2D (cudaMemcpyAsync)", "2 GiB", copy);
    r.bytes = 2.0 * double(bytes);
    x.ceil.copy_gbs = r.gbs();
    r.ratio = 1, r.ratio_to = "copy BW";
  }
  // GEMM: the 8192^3 bf16 product DESIGN.md's 785 TFLOP/s ceiling was read on, random inputs.
  const int n = 8192;
  Dev<__nv_bfloat16> a(size_t(n) * n), w(size_t(n) * n), y(size_t(n) * n);
  fill_uniform(a.p(), a.n, 11, -1.f, 1.f, x.st);
  fill_uniform(w.p(), w.n, 12, -1.f, 1.f, x.st);
  auto gemm = [&] { cuda::matmul_forward(y.p(), a.p(), w.p(), n, n, n, x.st); };
  Record& r = x.time("ceiling", "GEMM bf16 (cuBLASLt)", "8192x8192x8192", gemm);
  r.flops = 2.0 * n * n * n;
  x.ceil.gemm_tflops = r.tflops();
  r.ratio = 1, r.ratio_to = "GEMM 8192^3";
}

}  // namespace

int run_ops_cases(const OpsBenchOptions& o) {
  cuda::install_alloc_hooks();
  Ctx x;
  x.o = o;
  x.c = model_preset(o.preset);
  x.N = int(o.seq * o.batch);
  MOP_CUDA_CHECK(cudaStreamCreateWithFlags(&x.st, cudaStreamNonBlocking));
  // 256 MiB flush buffer: four times the H200's L2, so no input survives in the cache.
  const size_t flush_bytes = size_t(256) << 20;
  Dev<char> flush(flush_bytes);
  x.timing.flush = flush.p();
  x.timing.flush_bytes = flush_bytes;
  x.timing.warmup = 3;
  x.timing.samples = 20;

  const ModelConfig& c = x.c;
  fmt::print(
      "mop bench ops: {} | {} | preset {} (D {}, H {}/{} x {}, E {} top-{}, F {}, V {}), {} x {} = {} tokens | "
      "grouped GEMM default backend {}\n",
      cuda::device_description(), versions(), o.preset, c.hidden, c.heads, c.kv_heads, c.hd(), c.experts, c.top_k,
      c.expert_ffn, c.vocab_size, o.seq, o.batch, x.N, cuda::grouped_gemm_backend());
  std::fflush(stdout);
  measure_ceilings(x);
  if (ops_runs_group(o, "memory")) bench_memory_ops(x);
  if (ops_runs_group(o, "gemm")) bench_gemms(x);
  if (ops_runs_group(o, "grouped")) bench_grouped(x);
  if (ops_runs_group(o, "attention")) bench_attention(x);
  if (ops_runs_group(o, "head")) bench_head(x);
  MOP_CUDA_CHECK(cudaStreamSynchronize(x.st));
  print_table(x);
  if (!o.json.empty()) write_json(x, o.json);
  cudaStreamDestroy(x.st);
  return 0;
}

void print_table(const Ctx& x) {
  fmt::print("\n{:<9} {:<34} {:<30} {:>10} {:>8} {:>8} {:>7}  {:<22} {}\n", "group", "kernel", "shape", "us", "TFLOP/s",
             "GB/s", "ratio", "of", "target");
  int bars = 0, met = 0;
  std::string below;
  for (const Record& r : x.rows) {
    const std::string tf = r.flops > 0 ? fmt::format("{:.0f}", r.tflops()) : "";
    const std::string gb = r.bytes > 0 ? fmt::format("{:.0f}", r.gbs()) : "";
    const std::string ratio = r.ratio > 0 ? fmt::format("{:.2f}{}", r.ratio, r.time_ratio ? "x" : "") : "";
    std::string target;
    if (r.has_target()) {
      ++bars;
      met += r.meets();
      if (r.target > 0) target = fmt::format("{} {:.2f} ", r.time_ratio ? "<=" : ">=", r.target);
      if (r.extra_gib_max > 0) target += fmt::format("mem <= {:.0f} GiB ", r.extra_gib_max);
      target += r.meets() ? "ok" : "BELOW";
      if (!r.meets()) below += fmt::format("{}{} {} ({:.2f})", below.empty() ? "" : "; ", r.kernel, r.shape, r.ratio);
    }
    fmt::print("{:<9} {:<34} {:<30} {:>10.1f} {:>8} {:>8} {:>7}  {:<22} {}{}\n", r.group, r.kernel, r.shape,
               r.t.median_ms * 1e3, tf, gb, ratio, r.ratio_to, target, r.note.empty() ? "" : "  # " + r.note);
  }
  fmt::print("\nceilings: copy {:.0f} GB/s, GEMM {:.0f} TFLOP/s | {} of {} rows with a target meet it{}{}\n",
             x.ceil.copy_gbs, x.ceil.gemm_tflops, met, bars, below.empty() ? "" : "; below: ", below);
}

void write_json(const Ctx& x, const std::string& path) {
  std::ofstream f(path, std::ios::trunc);
  MOP_CHECK(f.good(), "cannot write --json file '{}'", path);
  for (const Record& r : x.rows) {
    nlohmann::json j;
    j["preset"] = x.o.preset, j["seq"] = x.o.seq, j["batch"] = x.o.batch, j["tokens"] = x.N;
    j["device"] = cuda::device_description();
    j["group"] = r.group, j["kernel"] = r.kernel, j["shape"] = r.shape;
    j["us"] = r.t.median_ms * 1e3, j["us_min"] = r.t.min_ms * 1e3, j["us_max"] = r.t.max_ms * 1e3;
    j["samples"] = r.t.samples;
    if (r.bytes > 0) j["bytes"] = r.bytes, j["gbps"] = r.gbs();
    if (r.flops > 0) j["flops"] = r.flops, j["tflops"] = r.tflops();
    if (r.ratio > 0) j["ratio"] = r.ratio, j["ratio_to"] = r.ratio_to, j["ratio_is_time"] = r.time_ratio;
    if (r.target > 0) j["target"] = r.target;
    if (r.extra_gib >= 0) j["extra_gib"] = r.extra_gib;
    if (r.extra_gib_max > 0) j["extra_gib_max"] = r.extra_gib_max;
    if (r.has_target()) j["meets"] = r.meets();
    if (!r.note.empty()) j["note"] = r.note;
    j["copy_gbps"] = x.ceil.copy_gbs, j["gemm_tflops"] = x.ceil.gemm_tflops;
    f << j.dump() << "\n";
  }
  MOP_CHECK(f.good(), "writing --json file '{}' failed", path);
}

}  // namespace mop::bench
