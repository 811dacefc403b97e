// GEMMs at the preset's shapes: the dense projections through cuBLASLt (TFLOP/s and the fraction
// of the 8192^3 ceiling), and the grouped expert GEMMs on both backends next to one dense cuBLASLt
// GEMM of the same FLOPs and direction, timed in the same run.
#include <fmt/format.h>

#include <string>
#include <vector>

#include "cli/ops_bench/cuda/ops_cases.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/matmul.h"

namespace mop::bench {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kGemmSamples = 10;  // 0.1-4 ms each: 10 samples give a stable median

// y = x w^T (fwd), dx = dy w (dgrad, bf16 out), dw += dy^T x (wgrad, fp32 accumulate): the three
// products of one linear layer, as the decoder runs them.
void dense_layer(Ctx& x, const std::string& name, int N, int I, int O, bool f32_out = false) {
  cudaStream_t st = x.st;
  auto X = random_dev<bf16>(size_t(N) * I, 61, -1.f, 1.f, st);
  auto W = random_dev<bf16>(size_t(O) * I, 62, -0.05f, 0.05f, st);
  auto dY = random_dev<bf16>(size_t(N) * O, 63, -1.f, 1.f, st);
  Dev<bf16> Y(f32_out ? 0 : size_t(N) * O), dX(size_t(N) * I);
  Dev<float> Yf(f32_out ? size_t(N) * O : 0), dW(size_t(O) * I);
  float* no_dw = nullptr;
  auto fwd = [&] {
    if (f32_out)
      cuda::matmul_forward_f32out(Yf.p(), X.p(), W.p(), N, I, O, st);
    else
      cuda::matmul_forward(Y.p(), X.p(), W.p(), N, I, O, st);
  };
  auto dgrad = [&] { cuda::matmul_backward(dX.p(), no_dw, dY.p(), X.p(), W.p(), N, I, O, st); };
  auto wgrad = [&] { cuda::matmul_backward(nullptr, dW.p(), dY.p(), X.p(), W.p(), N, I, O, st); };
  const double flops = 2.0 * N * I * O;
  const std::string sh = fmt::format("{}x{} -> {}", N, I, O);
  x.flop_row(x.time("gemm", name + " fwd", sh, fwd), flops);
  x.flop_row(x.time("gemm", name + " dgrad", sh, dgrad), flops);
  x.flop_row(x.time("gemm", name + " wgrad (fp32 +=)", sh, wgrad), flops);
}

// One expert projection: M rows split evenly over E experts, I -> O.
void grouped_projection(Ctx& x, const std::string& name, int M, int E, int I, int O) {
  cudaStream_t st = x.st;
  std::vector<int32_t> off(size_t(E) + 1);
  for (int e = 0; e <= E; ++e) off[size_t(e)] = int32_t(int64_t(M) * e / E);
  Dev<int32_t> dOff(off.size());
  MOP_CUDA_CHECK(cudaMemcpyAsync(dOff.p(), off.data(), off.size() * 4, cudaMemcpyHostToDevice, st));
  auto X = random_dev<bf16>(size_t(M) * I, 71, -1.f, 1.f, st);
  auto W = random_dev<bf16>(size_t(E) * O * I, 72, -0.05f, 0.05f, st);
  auto dY = random_dev<bf16>(size_t(M) * O, 73, -1.f, 1.f, st);
  Dev<bf16> Y(size_t(M) * O), dX(size_t(M) * I);
  Dev<float> dW(size_t(E) * O * I);
  Dev<bf16> dW16(size_t(E) * O * I);
  float* no_dw = nullptr;
  const double flops = 2.0 * M * I * O;
  const std::string sh = fmt::format("{}x{} -> {}, {} experts", M, I, O, E);
  const std::string dsh = fmt::format("{}x{} -> {}", M, I, O);

  // Dense references: the same FLOPs as one cuBLASLt product (expert 0's weights as the matrix).
  auto dense_fwd = [&] { cuda::matmul_forward(Y.p(), X.p(), W.p(), M, I, O, st); };
  auto dense_dgrad = [&] { cuda::matmul_backward(dX.p(), no_dw, dY.p(), X.p(), W.p(), M, I, O, st); };
  auto dense_wgrad = [&] { cuda::matmul_backward(nullptr, dW.p(), dY.p(), X.p(), W.p(), M, I, O, st); };
  const Record& dense_f = x.flop_row(x.time("grouped", "dense same FLOPs fwd", dsh, dense_fwd), flops);
  const Record& dense_d = x.flop_row(x.time("grouped", "dense same FLOPs dgrad", dsh, dense_dgrad), flops);
  const Record& dense_w = x.flop_row(x.time("grouped", "dense same FLOPs wgrad (fp32 +=)", dsh, dense_wgrad), flops);

  auto fwd = [&] { cuda::grouped_matmul_forward(Y.p(), X.p(), W.p(), dOff.p(), off.data(), E, I, O, st); };
  auto dgrad = [&] {
    cuda::grouped_matmul_backward(dX.p(), no_dw, dY.p(), X.p(), W.p(), dOff.p(), off.data(), E, I, O, st);
  };
  auto wgrad = [&] {
    cuda::grouped_matmul_backward(nullptr, dW.p(), dY.p(), X.p(), W.p(), dOff.p(), off.data(), E, I, O, st);
  };
  // The training step's forms with bf16 gradients (one micro-batch): added to, and overwriting.
  auto wgrad16 = [&](bool overwrite) {
    return [&, overwrite] {
      cuda::grouped_matmul_backward(nullptr, dW16.p(), dY.p(), X.p(), W.p(), dOff.p(), off.data(), E, I, O, st,
                                    overwrite);
    };
  };
  const std::string engine_default = cuda::grouped_gemm_backend();
  for (const char* backend : {"cutlass", "cublas"}) {
    cuda::set_grouped_gemm_backend(backend);
    const bool is_default = engine_default == backend;
    auto vs_dense = [&](Record& r, const Record& dense) {
      r.flops = flops;
      r.ratio = r.tflops() / dense.tflops();
      r.ratio_to = "dense same FLOPs";
      // The bar: torch._grouped_mm's 681 vs dense 759 TFLOP/s on the moe-7b shape (DESIGN.md).
      if (is_default)
        r.target = 0.90;
      else
        r.note = "not the engine's default";
    };
    const std::string k = fmt::format("{} {} ", name, backend);
    vs_dense(x.time("grouped", k + "fwd", sh, fwd), dense_f);
    vs_dense(x.time("grouped", k + "dgrad", sh, dgrad), dense_d);
    vs_dense(x.time("grouped", k + "wgrad (fp32 +=)", sh, wgrad), dense_w);
    vs_dense(x.time("grouped", k + "wgrad (bf16 +=)", sh, wgrad16(false)), dense_w);
    vs_dense(x.time("grouped", k + "wgrad (bf16 overwrite)", sh, wgrad16(true)), dense_w);
  }
  cuda::set_grouped_gemm_backend(engine_default.c_str());
}

}  // namespace

void bench_gemms(Ctx& x) {
  SamplesScope samples(x, kGemmSamples);
  const ModelConfig& c = x.c;
  const int N = x.N, D = int(c.hidden), Q = int(c.heads * c.hd()), KD = int(c.kv_heads * c.hd());
  dense_layer(x, "qkv proj", N, D, Q + 2 * KD);
  dense_layer(x, "o proj", N, Q, D);
  dense_layer(x, "router (fp32 logits)", N, D, int(c.experts), true);
  dense_layer(x, "lm head chunk", std::min(N, 4096), D, int(c.vocab_size));
}

void bench_grouped(Ctx& x) {
  SamplesScope samples(x, kGemmSamples);
  const ModelConfig& c = x.c;
  const int M = int(x.N * c.top_k), D = int(c.hidden), F = int(c.expert_ffn), E = int(c.experts);
  grouped_projection(x, "experts gate|up", M, E, D, 2 * F);
  grouped_projection(x, "experts down", M, E, F, D);
}

}  // namespace mop::bench
