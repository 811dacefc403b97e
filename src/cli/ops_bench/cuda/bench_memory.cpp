// Memory-bound kernels at the preset's shapes, as GB/s and the fraction of the copy bandwidth
// measured in the same run. Bytes are the fewest each op must move (every input read once, every
// output written once; small per-row statistics included, per-block partials not), so a ratio
// below 1 is traffic the kernel adds or bandwidth it leaves unused.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <unordered_set>
#include <vector>

#include "cli/ops_bench/cuda/fill.h"
#include "cli/ops_bench/cuda/ops_cases.h"
#include "model/ffn_block.h"
#include "model/params.h"
#include "ops/cuda/adamw.h"
#include "ops/cuda/cast.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/cross_entropy.h"
#include "ops/cuda/elementwise.h"
#include "ops/cuda/embedding.h"
#include "ops/cuda/moe_permute.h"
#include "ops/cuda/rmsnorm.h"
#include "ops/cuda/rope.h"
#include "ops/cuda/router.h"
#include "ops/cuda/swiglu.h"

namespace mop::bench {
namespace {

using bf16 = __nv_bfloat16;

void norms_and_rope(Ctx& x) {
  const ModelConfig& c = x.c;
  const int N = x.N, D = int(c.hidden), H = int(c.heads), KV = int(c.kv_heads), hd = int(c.hd());
  const size_t ND = size_t(N) * D;
  const float eps = float(c.norm_eps);
  cudaStream_t st = x.st;
  const std::string nd = fmt::format("{}x{}", N, D);
  auto X = random_dev<bf16>(ND, 21, -2.f, 2.f, st), R = random_dev<bf16>(ND, 22, -2.f, 2.f, st),
       dY = random_dev<bf16>(ND, 23, -1.f, 1.f, st), W = random_dev<bf16>(size_t(D), 24, 0.5f, 1.5f, st);
  Dev<bf16> Y(ND), R2(ND), dX(ND);
  Dev<float> rstd{size_t(N)}, dw{size_t(D)};
  Dev<float> scratch(
      std::max({cuda::rmsnorm_backward_scratch_floats(N, D), cuda::qk_norm_rope_backward_scratch_floats(N, H, hd)}));
  x.memory_row(
      x.time("memory", "rmsnorm fwd", nd, [&] { cuda::rmsnorm_forward(Y.p(), rstd.p(), X.p(), W.p(), N, D, eps, st); }),
      4.0 * ND + 4.0 * N);
  x.memory_row(
      x.time("memory", "rmsnorm bwd", nd,
             [&] { cuda::rmsnorm_backward(dX.p(), dw.p(), dY.p(), X.p(), W.p(), rstd.p(), N, D, scratch.p(), st); }),
      6.0 * ND + 4.0 * N);
  x.memory_row(
      x.time("memory", "residual add + rmsnorm fwd", nd,
             [&] { cuda::rmsnorm_residual_forward(R2.p(), Y.p(), rstd.p(), R.p(), X.p(), W.p(), N, D, eps, st); }),
      8.0 * ND + 4.0 * N);
  x.memory_row(x.time("memory", "residual add (bf16)", nd, [&] { cuda::add_bf16(R2.p(), R.p(), X.p(), ND, st); }),
               6.0 * ND);

  // The fused q|k|v GEMM output split into contiguous q, k and v (forward; backward joins them),
  // by the kernel the decoder uses and by the 2D copy it replaced.
  {
    const int Q = H * hd, KD = KV * hd, O = Q + 2 * KD;
    const size_t NO = size_t(N) * O;
    auto QKV = random_dev<bf16>(NO, 26, -1.f, 1.f, st);
    Dev<bf16> parts{NO};
    const std::string shape = fmt::format("{}x{} -> {}|{}|{}", N, O, Q, KD, KD);
    const int widths[3] = {Q, KD, KD}, cols[3] = {0, Q, Q + KD};
    size_t at[3] = {0, size_t(N) * Q, size_t(N) * (Q + KD)};
    x.memory_row(x.time("memory", "q|k|v split (row copy kernel)", shape, [&] {
      for (int i = 0; i < 3; ++i)
        cuda::copy_rows_bf16(parts.p() + at[i], size_t(widths[i]), QKV.p() + cols[i], size_t(O), size_t(N),
                             size_t(widths[i]), st);
    }), 4.0 * NO);
    x.memory_row(x.time("memory", "q|k|v split (cudaMemcpy2DAsync)", shape, [&] {
      for (int i = 0; i < 3; ++i)
        MOP_CUDA_CHECK(cudaMemcpy2DAsync(parts.p() + at[i], size_t(widths[i]) * 2, QKV.p() + cols[i], size_t(O) * 2,
                                         size_t(widths[i]) * 2, size_t(N), cudaMemcpyDeviceToDevice, st));
    }), 4.0 * NO).note = "not the engine's path";
  }

  // QK-norm + RoPE over contiguous q (H heads) and k (KV heads), as the decoder calls them.
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int n = 0; n < N; ++n) pos[size_t(n)] = int32_t(n % x.o.seq);
  Dev<int32_t> P{size_t(N)};
  MOP_CUDA_CHECK(cudaMemcpyAsync(P.p(), pos.data(), size_t(N) * 4, cudaMemcpyHostToDevice, st));
  auto Wq = random_dev<bf16>(size_t(hd), 25, 0.5f, 1.5f, st);
  Dev<float> dwq{size_t(hd)}, rstd_h(size_t(N) * H);
  for (const auto& qk : {std::pair<const char*, int>{"q", H}, std::pair<const char*, int>{"k", KV}}) {
    const char* name = qk.first;
    const int heads = qk.second;
    const size_t n = size_t(N) * heads * hd;
    auto In = random_dev<bf16>(n, 26, -2.f, 2.f, st), dOut = random_dev<bf16>(n, 27, -1.f, 1.f, st);
    Dev<bf16> Out(n), dIn(n);
    const std::string sh = fmt::format("{}x{}x{}", N, heads, hd);
    x.memory_row(x.time("memory", fmt::format("qk-norm + rope fwd ({})", name), sh,
                        [&] {
                          cuda::qk_norm_rope_forward(Out.p(), rstd_h.p(), In.p(), Wq.p(), P.p(), N, heads, hd,
                                                     heads * hd, eps, c.rope_theta, st);
                        }),
                 4.0 * n + 4.0 * N * heads + 4.0 * N);
    x.memory_row(x.time("memory", fmt::format("qk-norm + rope bwd ({})", name), sh,
                        [&] {
                          cuda::qk_norm_rope_backward(dIn.p(), dwq.p(), dOut.p(), In.p(), Wq.p(), rstd_h.p(), P.p(), N,
                                                      heads, hd, heads * hd, c.rope_theta, scratch.p(), st);
                        }),
                 6.0 * n + 4.0 * N * heads + 4.0 * N);
  }
}

void experts_path(Ctx& x) {
  const ModelConfig& c = x.c;
  const int N = x.N, D = int(c.hidden), E = int(c.experts), K = int(c.top_k), F = int(c.expert_ffn);
  const size_t M = size_t(N) * K, ND = size_t(N) * D, MD = M * D, MF = M * F;
  cudaStream_t st = x.st;

  // Router on fp32 logits (the router GEMM's output), then the dispatch layout.
  const cpu::RouterConfig rc = router_config(c);
  auto logits = random_dev<float>(size_t(N) * E, 31, -3.f, 3.f, st), dwk = random_dev<float>(M, 32, -1.f, 1.f, st);
  Dev<float> probs(size_t(N) * E), wk(M), dlogits(size_t(N) * E);
  Dev<int32_t> idx(M), row(M), off(size_t(E) + 1);
  const std::string ne = fmt::format("{}x{} top-{}", N, E, K);
  x.memory_row(x.time("memory", fmt::format("router fwd ({}, top-k)", c.router), ne,
                      [&] { cuda::router_forward(probs.p(), idx.p(), wk.p(), logits.p(), nullptr, rc, N, st); }),
               8.0 * N * E + 8.0 * M);
  x.memory_row(x.time("memory", "router bwd", ne,
                      [&] { cuda::router_backward(dlogits.p(), dwk.p(), nullptr, probs.p(), idx.p(), rc, N, st); }),
               8.0 * N * E + 8.0 * M);
  fill_topk_ids(idx.p(), N, K, E, 33, st);  // near-uniform loads (the router's picks depend on the draw)
  Dev<char> ws(cuda::moe_route_layout_workspace(N, E, K));
  x.time("memory", "moe route layout (radix sort)", ne, [&] {
     cuda::moe_route_layout(row.p(), off.p(), idx.p(), N, E, K, ws.p(), ws.bytes(), st);
   }).note = "a sort: time only";

  auto H2 = random_dev<bf16>(ND, 34, -2.f, 2.f, st), YP = random_dev<bf16>(MD, 35, -1.f, 1.f, st),
       dY = random_dev<bf16>(ND, 36, -1.f, 1.f, st);
  Dev<bf16> XP(MD), dH(ND), Y(ND), dYP(MD);
  Dev<float> dW(M);
  const std::string nkd = fmt::format("{}x{}x{}", N, K, D);
  x.memory_row(x.time("memory", "moe permute", nkd, [&] { cuda::moe_permute(XP.p(), H2.p(), row.p(), N, K, D, st); }),
               2.0 * (ND + MD) + 4.0 * M);
  x.memory_row(x.time("memory", "moe permute bwd (sum over k)", nkd,
                      [&] { cuda::moe_permute_backward(dH.p(), YP.p(), row.p(), N, K, D, st); }),
               2.0 * (ND + MD) + 4.0 * M);
  x.memory_row(
      x.time("memory", "moe combine", nkd, [&] { cuda::moe_combine(Y.p(), YP.p(), wk.p(), row.p(), N, K, D, st); }),
      2.0 * (ND + MD) + 8.0 * M);
  x.memory_row(
      x.time("memory", "moe combine bwd", nkd,
             [&] { cuda::moe_combine_backward(dYP.p(), dW.p(), dY.p(), YP.p(), wk.p(), row.p(), N, K, D, st); }),
      2.0 * (ND + 2 * MD) + 12.0 * M);

  // SwiGLU over the expert-sorted rows.
  auto GU = random_dev<bf16>(2 * MF, 37, -3.f, 3.f, st), dA = random_dev<bf16>(MF, 38, -1.f, 1.f, st);
  Dev<bf16> A(MF), dGU(2 * MF);
  const std::string mf = fmt::format("{}x{}", M, F);
  x.memory_row(x.time("memory", "swiglu fwd", mf, [&] { cuda::swiglu_forward(A.p(), GU.p(), int(M), F, st); }),
               6.0 * MF);
  x.memory_row(
      x.time("memory", "swiglu bwd", mf, [&] { cuda::swiglu_backward(dGU.p(), dA.p(), GU.p(), int(M), F, st); }),
      10.0 * MF);
}

// AdamW, casts and the gradient norm over one decoder layer's real tensor list (the multi-tensor
// step sees the same tensor count and sizes as in training; one layer keeps the buffers small).
void optimizer_path(Ctx& x) {
  const ParamTable t = build_param_table(x.c);
  std::vector<const ParamSpec*> layer;
  size_t n = 0;
  for (const auto& p : t.params)
    if (p.layer == 0 && p.trainable) layer.push_back(&p), n += size_t(p.numel);
  cudaStream_t st = x.st;
  auto P = random_dev<float>(n, 41, -0.02f, 0.02f, st), G = random_dev<float>(n, 42, -1e-3f, 1e-3f, st),
       Mm = random_dev<float>(n, 43, -1e-3f, 1e-3f, st), Vv = random_dev<float>(n, 44, 0.f, 1e-6f, st);
  Dev<bf16> Pb(n);
  std::vector<cuda::AdamWTensor> ts;
  size_t o = 0;
  for (const ParamSpec* p : layer) {
    ts.push_back({P.p() + o, G.p() + o, Mm.p() + o, Vv.p() + o, Pb.p() + o, size_t(p->numel), p->decay ? 0.1f : 0.f});
    o += size_t(p->numel);
  }
  const cuda::AdamWArgs a{1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 0.3f, 1.f};
  const std::string sh = fmt::format("{:.0f}M params, {} tensors", double(n) * 1e-6, ts.size());
  const std::string flat = fmt::format("{}", n);
  Dev<float> scratch(cuda::sum_squares_scratch_floats(n));
  Dev<double> out(1);
  auto step = [&] { cuda::adamw_step_multi(ts.data(), int(ts.size()), a, st); };
  auto norm = [&] { cuda::sum_squares(out.p(), G.p(), n, scratch.p(), st); };
  auto down = [&] { cuda::cast_f32_to_bf16(Pb.p(), P.p(), n, st); };
  auto up = [&] { cuda::cast_bf16_to_f32(G.p(), Pb.p(), n, st); };
  SamplesScope samples(x, 10);  // 0.1-2.3 ms per call
  x.memory_row(x.time("memory", "adamw multi-tensor (+bf16 copy)", sh, step), 30.0 * double(n));
  x.memory_row(x.time("memory", "grad sum of squares (fp64)", sh, norm), 4.0 * double(n));
  x.memory_row(x.time("memory", "cast fp32 -> bf16", flat, down), 6.0 * double(n));
  x.memory_row(x.time("memory", "cast bf16 -> fp32", flat, up), 6.0 * double(n));
}

void embedding_and_loss(Ctx& x) {
  const ModelConfig& c = x.c;
  const int N = x.N, D = int(c.hidden), V = int(c.vocab_size);
  const size_t ND = size_t(N) * D;
  cudaStream_t st = x.st;
  auto Wte = random_dev<bf16>(size_t(V) * D, 51, -0.05f, 0.05f, st), dOut = random_dev<bf16>(ND, 52, -1.f, 1.f, st);
  Dev<float> dWte(size_t(V) * D);
  Dev<bf16> Out(ND);
  Dev<int32_t> tok{size_t(N)};
  fill_ids(tok.p(), size_t(N), 53, V, st);
  // Repeated ids read (and update) one row: count the rows each direction must touch.
  std::vector<int32_t> h(static_cast<size_t>(N));
  MOP_CUDA_CHECK(cudaMemcpyAsync(h.data(), tok.p(), size_t(N) * 4, cudaMemcpyDeviceToHost, st));
  MOP_CUDA_CHECK(cudaStreamSynchronize(st));
  const double distinct = double(std::unordered_set<int32_t>(h.begin(), h.end()).size());
  const std::string sh = fmt::format("{}x{} of {}", N, D, V);
  x.memory_row(
      x.time("memory", "embedding fwd", sh, [&] { cuda::embedding_forward(Out.p(), tok.p(), Wte.p(), N, D, V, st); }),
      2.0 * ND + 2.0 * distinct * D + 4.0 * N);
  Dev<char> ws(cuda::embedding_backward_workspace(N));
  x.memory_row(x.time("memory", "embedding bwd (sorted, determ.)", sh,
                      [&] { cuda::embedding_backward(dWte.p(), dOut.p(), tok.p(), N, D, V, ws.p(), ws.bytes(), st); }),
               2.0 * ND + 8.0 * distinct * D + 4.0 * N);

  // Cross-entropy over one head chunk of logits (the decoder's 4096-row chunk): read once, write
  // the gradient once.
  const int R = std::min(N, 4096);
  const size_t RV = size_t(R) * V;
  auto L = random_dev<bf16>(RV, 54, -4.f, 4.f, st);
  Dev<bf16> dL(RV);
  Dev<int32_t> tgt{size_t(R)};
  fill_ids(tgt.p(), size_t(R), 55, V, st);
  Dev<float> loss{size_t(R)}, lse{size_t(R)};
  x.memory_row(x.time("memory", "cross-entropy fwd+bwd", fmt::format("{}x{}", R, V),
                      [&] {
                        cuda::cross_entropy_forward_backward(loss.p(), lse.p(), dL.p(), L.p(), tgt.p(), R, V,
                                                             1.f / float(N), st);
                      }),
               4.0 * double(RV) + 8.0 * R);
}

}  // namespace

void bench_memory_ops(Ctx& x) {
  norms_and_rope(x);
  experts_path(x);
  optimizer_path(x);
  embedding_and_loss(x);
}

}  // namespace mop::bench
