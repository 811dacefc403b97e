// Causal attention through the cuDNN frontend (the engine's attention op) at the preset's shape
// (batch documents of seq tokens, GQA) and at DESIGN.md's reference shapes (one 16K-token
// document, 16 heads, head dim 128 and 64), where PyTorch's cuDNN SDPA reached 635 / 576 and
// 466 / 444 TFLOP/s forward / backward.
#include <fmt/format.h>

#include <cmath>
#include <vector>

#include "cli/ops_bench/cuda/ops_cases.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/check.cuh"

namespace mop::bench {
namespace {

using bf16 = __nv_bfloat16;

void attention_case(Ctx& x, const std::string& label, int B, int S, int H, int KV, int hd, const std::string& bar) {
  cudaStream_t st = x.st;
  const int N = B * S;
  const size_t nq = size_t(N) * H * hd, nkv = size_t(N) * KV * hd;
  std::vector<int32_t> cu(size_t(B) + 1);
  for (int b = 0; b <= B; ++b) cu[size_t(b)] = b * S;
  Dev<int32_t> dCu(cu.size());
  MOP_CUDA_CHECK(cudaMemcpyAsync(dCu.p(), cu.data(), cu.size() * 4, cudaMemcpyHostToDevice, st));
  auto Q = random_dev<bf16>(nq, 81, -1.f, 1.f, st), K = random_dev<bf16>(nkv, 82, -1.f, 1.f, st),
       V = random_dev<bf16>(nkv, 83, -1.f, 1.f, st), dO = random_dev<bf16>(nq, 84, -1.f, 1.f, st);
  Dev<bf16> O(nq), dQ(nq), dK(nkv), dV(nkv);
  Dev<float> lse(size_t(N) * H);
  const int qs = H * hd, kvs = KV * hd;
  const float scale = 1.f / std::sqrt(float(hd));
  // Builds (and caches) the cuDNN graphs: outside the timing.
  const size_t ws_bytes = cuda::attention_workspace_bytes(B, S, N, H, KV, hd, qs, kvs);
  Dev<char> ws(ws_bytes);
  // Causal FLOPs as DESIGN.md counts them: 2 products of 2 S^2/2 H hd each forward, 2.5x backward.
  const double fwd = 2.0 * 2.0 * double(S) * S / 2 * H * hd * B;
  const std::string sh = fmt::format("{}x{} H {}/{} hd {}", B, S, H, KV, hd);
  auto forward = [&] {
    cuda::attention_forward(O.p(), lse.p(), Q.p(), K.p(), V.p(), dCu.p(), cu.data(), B, S, N, H, KV, hd, scale, qs, kvs,
                            ws.p(), ws_bytes, st);
  };
  auto backward = [&] {
    cuda::attention_backward(dQ.p(), dK.p(), dV.p(), dO.p(), O.p(), lse.p(), Q.p(), K.p(), V.p(), dCu.p(), cu.data(), B,
                             S, N, H, KV, hd, scale, qs, kvs, ws.p(), ws_bytes, st);
  };
  Record& f = x.flop_row(x.time("attention", label + " fwd", sh, forward), fwd);
  Record& b = x.flop_row(x.time("attention", label + " bwd", sh, backward), 2.5 * fwd);
  if (!bar.empty()) f.note = b.note = bar;
}

}  // namespace

void bench_attention(Ctx& x) {
  SamplesScope samples(x, 10);  // 0.3-5 ms per call
  const ModelConfig& c = x.c;
  attention_case(x, "attention (preset)", int(x.o.batch), int(x.o.seq), int(c.heads), int(c.kv_heads), int(c.hd()), "");
  attention_case(x, "attention 16K hd128", 1, 16384, 16, 16, 128, "PyTorch cuDNN 635 / 576 (DESIGN.md)");
  attention_case(x, "attention 16K hd64", 1, 16384, 16, 16, 64, "PyTorch cuDNN 466 / 444 (DESIGN.md)");
}

}  // namespace mop::bench
