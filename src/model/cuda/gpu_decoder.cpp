#include "model/cuda/gpu_decoder.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/ffn_block.h"
#include "ops/cuda/adamw.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/cast.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/cross_entropy.h"
#include "ops/cuda/elementwise.h"
#include "ops/cuda/embedding.h"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/matmul.h"
#include "ops/cuda/moe_permute.h"
#include "ops/cuda/rmsnorm.h"
#include "ops/cuda/rope.h"
#include "ops/cuda/router.h"
#include "ops/cuda/runtime.h"
#include "ops/cuda/swiglu.h"

namespace mop {

using bf16 = __nv_bfloat16;

namespace {
// A typed device buffer of one memory category.
template <class T> struct Dev {
  Buffer buf;
  size_t n = 0;
  Dev() = default;
  Dev(size_t count, Mem cat) : buf(Device::cuda, cat, std::max<size_t>(count, 1) * sizeof(T)), n(count) {}
  T* p() const { return buf.as<T>(); }
};
}  // namespace

struct GpuDecoder::Acts {
  struct Layer {
    Dev<bf16> h1, qkv, q_raw, k_raw, q, k, v, att, x2, h2;
    Dev<float> rstd1, rstd_q, rstd_k, lse, rstd2;
    Dev<float> logits, probs, w;           // (N, E), (N, E), (N, K)
    Dev<int32_t> idx, row, offsets, counts;  // (N, K), (N K), (E + 1), (E)
    std::vector<int32_t> offsets_host;     // (E + 1), read once per layer for the grouped GEMM sizes
    Dev<bf16> xp, gu, a, yp, sgu, sa;
    Dev<float> lb;                         // (1) this layer's load-balancing loss
  };
  int N = 0;
  Dev<int32_t> tokens, targets, positions, cu;
  std::vector<int32_t> cu_host;
  int max_doc = 0;
  std::vector<Dev<bf16>> xs;  // (L + 1) x (N, D) residual stream
  std::vector<Layer> layers;
  Dev<bf16> hf;
  Dev<float> rstdf;
  // Backward temporaries, shared by all layers.
  Dev<bf16> dx, dx2, dh, dtmp, datt, dq, dk, dv, dkr, dqkv, dyp, da, dgu, dxp, dlogits_bf, dhead_chunk, logits_chunk;
  Dev<float> dw, dprobs, dlogits, ce_loss, ce_lse, scratch;
  Dev<char> workspace;
  size_t workspace_bytes = 0;
};

GpuDecoder::GpuDecoder(const ModelConfig& c, const ParamTable& t) : c_(c), table_(t) {
  MOP_CHECK(cuda::device_count() > 0, "no CUDA device");
  cuda::install_alloc_hooks();
  MOP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  const size_t n = size_t(t.total);
  master_ = Buffer(Device::cuda, Mem::params, n * 4);
  weights_ = Buffer(Device::cuda, Mem::params, n * 2);
  grads_ = Buffer(Device::cuda, Mem::grads, n * 4);
  m_ = Buffer(Device::cuda, Mem::optimizer, n * 4);
  v_ = Buffer(Device::cuda, Mem::optimizer, n * 4);
  MOP_CUDA_CHECK(cudaMemsetAsync(m_.data(), 0, n * 4, stream_));
  MOP_CUDA_CHECK(cudaMemsetAsync(v_.data(), 0, n * 4, stream_));
  w_ = make_view<bf16>(t, c, weights_.as<bf16>());
  g_ = make_view<float>(t, c, grads_.as<float>());
}

GpuDecoder::~GpuDecoder() {
  acts_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

void GpuDecoder::upload_params(const float* host) {
  const size_t n = size_t(table_.total);
  MOP_CUDA_CHECK(cudaMemcpyAsync(master_.data(), host, n * 4, cudaMemcpyHostToDevice, stream_));
  cuda::cast_f32_to_bf16(weights_.as<bf16>(), master_.as<float>(), n, stream_);
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::download_params(float* host) const {
  MOP_CUDA_CHECK(cudaMemcpyAsync(host, master_.data(), size_t(table_.total) * 4, cudaMemcpyDeviceToHost, stream_));
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::zero_grads() {
  MOP_CUDA_CHECK(cudaMemsetAsync(grads_.data(), 0, size_t(table_.total) * 4, stream_));
}

void GpuDecoder::ensure_acts(int N) {
  if (acts_ && acts_N_ == N) return;
  acts_.reset();
  auto a = std::make_unique<Acts>();
  const int D = int(c_.hidden), H = int(c_.heads), KV = int(c_.kv_heads), hd = int(c_.hd()), L = int(c_.layers);
  const int E = int(c_.experts), K = int(c_.top_k), F = int(c_.expert_ffn), V = int(c_.vocab_size);
  const size_t Q = size_t(H) * hd, KD = size_t(KV) * hd, O = Q + 2 * KD, M = size_t(N) * K;
  const size_t ND = size_t(N) * D;
  const Mem A = Mem::activations, W = Mem::workspace;
  a->N = N;
  a->tokens = Dev<int32_t>(N, A), a->targets = Dev<int32_t>(N, A), a->positions = Dev<int32_t>(N, A);
  a->cu = Dev<int32_t>(size_t(N) + 1, A);
  for (int l = 0; l <= L; ++l) a->xs.emplace_back(ND, A);
  size_t max_f = 2 * size_t(F) * M, max_a = size_t(F) * M;
  a->layers.resize(size_t(L));
  for (int l = 0; l < L; ++l) {
    auto& y = a->layers[size_t(l)];
    y.h1 = Dev<bf16>(ND, A), y.rstd1 = Dev<float>(N, A), y.qkv = Dev<bf16>(size_t(N) * O, A);
    y.q_raw = Dev<bf16>(size_t(N) * Q, A), y.k_raw = Dev<bf16>(size_t(N) * KD, A);
    y.q = Dev<bf16>(size_t(N) * Q, A), y.k = Dev<bf16>(size_t(N) * KD, A), y.v = Dev<bf16>(size_t(N) * KD, A);
    y.rstd_q = Dev<float>(size_t(N) * H, A), y.rstd_k = Dev<float>(size_t(N) * KV, A);
    y.att = Dev<bf16>(size_t(N) * Q, A), y.lse = Dev<float>(size_t(N) * H, A);
    y.x2 = Dev<bf16>(ND, A), y.h2 = Dev<bf16>(ND, A), y.rstd2 = Dev<float>(N, A);
    if (c_.is_moe_layer(l)) {
      y.logits = Dev<float>(size_t(N) * E, A), y.probs = Dev<float>(size_t(N) * E, A), y.w = Dev<float>(M, A);
      y.idx = Dev<int32_t>(M, A), y.row = Dev<int32_t>(M, A), y.offsets = Dev<int32_t>(size_t(E) + 1, A);
      y.counts = Dev<int32_t>(E, A), y.offsets_host.assign(size_t(E) + 1, 0), y.lb = Dev<float>(1, A);
      y.xp = Dev<bf16>(M * D, A), y.gu = Dev<bf16>(M * 2 * F, A), y.a = Dev<bf16>(M * F, A), y.yp = Dev<bf16>(M * D, A);
      if (c_.shared_experts > 0) {
        const size_t Fs = size_t(c_.shared_width());
        y.sgu = Dev<bf16>(size_t(N) * 2 * Fs, A), y.sa = Dev<bf16>(size_t(N) * Fs, A);
        max_f = std::max(max_f, 2 * Fs * N), max_a = std::max(max_a, Fs * N);
      }
    } else {
      const size_t Fd = size_t(c_.dense_width());
      y.gu = Dev<bf16>(size_t(N) * 2 * Fd, A), y.a = Dev<bf16>(size_t(N) * Fd, A);
      max_f = std::max(max_f, 2 * Fd * N), max_a = std::max(max_a, Fd * N);
    }
  }
  a->hf = Dev<bf16>(ND, A), a->rstdf = Dev<float>(N, A);
  a->dx = Dev<bf16>(ND, W), a->dx2 = Dev<bf16>(ND, W), a->dh = Dev<bf16>(ND, W), a->dtmp = Dev<bf16>(ND, W);
  a->datt = Dev<bf16>(size_t(N) * Q, W), a->dq = Dev<bf16>(size_t(N) * Q, W), a->dk = Dev<bf16>(size_t(N) * KD, W);
  a->dv = Dev<bf16>(size_t(N) * KD, W), a->dkr = Dev<bf16>(size_t(N) * KD, W), a->dqkv = Dev<bf16>(size_t(N) * O, W);
  a->dyp = Dev<bf16>(M * D, W), a->da = Dev<bf16>(max_a, W), a->dgu = Dev<bf16>(max_f, W), a->dxp = Dev<bf16>(M * D, W);
  a->dw = Dev<float>(M, W), a->dprobs = Dev<float>(size_t(N) * E, W), a->dlogits = Dev<float>(size_t(N) * E, W);
  a->dlogits_bf = Dev<bf16>(size_t(N) * E, W);
  const int R = std::min(N, 4096);  // head rows per chunk: R x V bf16 logits alive at once
  a->logits_chunk = Dev<bf16>(size_t(R) * V, W);
  a->ce_loss = Dev<float>(N, W), a->ce_lse = Dev<float>(N, W);
  size_t scratch = std::max({cuda::rmsnorm_backward_scratch_floats(N, D),
                             cuda::qk_norm_rope_backward_scratch_floats(N, H, hd),
                             cuda::sum_squares_scratch_floats(size_t(table_.total))});
  a->scratch = Dev<float>(scratch, W);
  a->workspace_bytes = std::max({cuda::embedding_backward_workspace(N), cuda::moe_route_layout_workspace(N, E, K),
                                 size_t(256) << 20});  // attention: cuDNN asks for at most this here
  a->workspace = Dev<char>(a->workspace_bytes, W);
  acts_ = std::move(a);
  acts_N_ = N;
}

namespace {
// Rows [col, col + width) of each of N rows of `stride` elements, to/from a contiguous (N, width).
void copy_cols(bf16* dst, size_t dst_stride, const bf16* src, size_t src_stride, int N, size_t width, cudaStream_t s) {
  if (N == 0) return;
  MOP_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_stride * 2, src, src_stride * 2, width * 2, size_t(N),
                                   cudaMemcpyDeviceToDevice, s));
}
}  // namespace

LossStats GpuDecoder::forward_backward(const TokenBatch& b, float ce_scale, float lb_scale) {
  return run(b, ce_scale, lb_scale, true);
}
LossStats GpuDecoder::forward_loss(const TokenBatch& b) { return run(b, 0.f, 0.f, false); }

LossStats GpuDecoder::run(const TokenBatch& b, float ce_scale, float lb_scale, bool backward) {
  const int N = b.N, D = int(c_.hidden), H = int(c_.heads), KV = int(c_.kv_heads), hd = int(c_.hd());
  const int L = int(c_.layers), E = int(c_.experts), K = int(c_.top_k), F = int(c_.expert_ffn), V = int(c_.vocab_size);
  const int Q = H * hd, KD = KV * hd, O = Q + 2 * KD, M = N * K;
  const float eps = float(c_.norm_eps);
  const float scale = float(1.0 / std::sqrt(double(hd)));
  cudaStream_t st = stream_;
  ensure_acts(N);
  Acts& a = *acts_;
  const cpu::RouterConfig rc = router_config(c_);
  ModelView<float> master = make_view<float>(table_, c_, master_.as<float>());

  // Batch to the device. The host keeps cu_seqlens for cuDNN's maximum sequence length.
  MOP_CUDA_CHECK(cudaMemcpyAsync(a.tokens.p(), b.tokens, size_t(N) * 4, cudaMemcpyHostToDevice, st));
  MOP_CUDA_CHECK(cudaMemcpyAsync(a.positions.p(), b.positions, size_t(N) * 4, cudaMemcpyHostToDevice, st));
  MOP_CUDA_CHECK(cudaMemcpyAsync(a.cu.p(), b.cu_seqlens, size_t(b.n_docs + 1) * 4, cudaMemcpyHostToDevice, st));
  if (b.targets) MOP_CUDA_CHECK(cudaMemcpyAsync(a.targets.p(), b.targets, size_t(N) * 4, cudaMemcpyHostToDevice, st));
  int max_doc = 0;
  for (int d = 0; d < b.n_docs; ++d) max_doc = std::max(max_doc, b.cu_seqlens[d + 1] - b.cu_seqlens[d]);
  for (int i = 0; i < N; ++i)
    MOP_CHECK(b.tokens[i] >= 0 && b.tokens[i] < V, "token {} at position {} is outside the vocabulary of {}",
              b.tokens[i], i, V);

  LossStats stats;
  stats.counts.assign(size_t(L) * E, 0);
  cuda::embedding_forward(a.xs[0].p(), a.tokens.p(), w_.embed, N, D, V, st);
  for (int l = 0; l < L; ++l) {
    auto& y = a.layers[size_t(l)];
    const LayerView<bf16>& w = w_.layers[size_t(l)];
    const bf16* x = a.xs[size_t(l)].p();
    bf16* out = a.xs[size_t(l) + 1].p();
    cuda::rmsnorm_forward(y.h1.p(), y.rstd1.p(), x, w.ln1, N, D, eps, st);
    cuda::matmul_forward(y.qkv.p(), y.h1.p(), w.wqkv, N, D, O, st);
    copy_cols(y.q_raw.p(), Q, y.qkv.p(), O, N, Q, st);
    copy_cols(y.k_raw.p(), KD, y.qkv.p() + Q, O, N, KD, st);
    copy_cols(y.v.p(), KD, y.qkv.p() + Q + KD, O, N, KD, st);
    cuda::qk_norm_rope_forward(y.q.p(), c_.qk_norm ? y.rstd_q.p() : nullptr, y.q_raw.p(), w.q_norm, a.positions.p(), N,
                               H, hd, Q, eps, c_.rope_theta, st);
    cuda::qk_norm_rope_forward(y.k.p(), c_.qk_norm ? y.rstd_k.p() : nullptr, y.k_raw.p(), w.k_norm, a.positions.p(),
                               N, KV, hd, KD, eps, c_.rope_theta, st);
    cuda::attention_forward(y.att.p(), y.lse.p(), y.q.p(), y.k.p(), y.v.p(), a.cu.p(), b.cu_seqlens, b.n_docs, max_doc,
                            N, H, KV, hd, scale, Q, KD, a.workspace.p(), a.workspace_bytes, st);
    cuda::matmul_forward(a.dtmp.p(), y.att.p(), w.wo, N, Q, D, st);
    // x2 = x + o and h2 = rmsnorm(x2) in one pass.
    cuda::rmsnorm_residual_forward(y.x2.p(), y.h2.p(), y.rstd2.p(), x, a.dtmp.p(), w.ln2, N, D, eps, st);

    if (!c_.is_moe_layer(l)) {
      const int Fd = int(c_.dense_width());
      cuda::matmul_forward(y.gu.p(), y.h2.p(), w.w_gu, N, D, 2 * Fd, st);
      cuda::swiglu_forward(y.a.p(), y.gu.p(), N, Fd, st);
      cuda::matmul_forward(a.dtmp.p(), y.a.p(), w.w_down, N, Fd, D, st);
    } else {
      cuda::matmul_forward_f32out(y.logits.p(), y.h2.p(), w.router, N, D, E, st);
      cuda::router_forward(y.probs.p(), y.idx.p(), y.w.p(), y.logits.p(), master.layers[size_t(l)].router_bias, rc, N,
                           st);
      cuda::moe_expert_counts(y.counts.p(), y.idx.p(), N, E, K, st);
      cuda::moe_lb_loss(y.lb.p(), a.dprobs.p(), y.probs.p(), y.counts.p(), N, E, K, st);
      cuda::moe_route_layout(y.row.p(), y.offsets.p(), y.idx.p(), N, E, K, a.workspace.p(), a.workspace_bytes, st);
      // The one host synchronisation of the layer: the grouped GEMM takes its sizes from the host.
      MOP_CUDA_CHECK(cudaMemcpyAsync(y.offsets_host.data(), y.offsets.p(), size_t(E + 1) * 4, cudaMemcpyDeviceToHost,
                                     st));
      MOP_CUDA_CHECK(cudaStreamSynchronize(st));
      cuda::moe_permute(y.xp.p(), y.h2.p(), y.row.p(), N, K, D, st);
      cuda::grouped_matmul_forward(y.gu.p(), y.xp.p(), w.w_gu, y.offsets.p(), y.offsets_host.data(), E, D, 2 * F, st);
      cuda::swiglu_forward(y.a.p(), y.gu.p(), M, F, st);
      cuda::grouped_matmul_forward(y.yp.p(), y.a.p(), w.w_down, y.offsets.p(), y.offsets_host.data(), E, F, D, st);
      cuda::moe_combine(a.dtmp.p(), y.yp.p(), y.w.p(), y.row.p(), N, K, D, st);
      if (c_.shared_experts > 0) {
        const int Fs = int(c_.shared_width());
        cuda::matmul_forward(y.sgu.p(), y.h2.p(), w.shared_gu, N, D, 2 * Fs, st);
        cuda::swiglu_forward(y.sa.p(), y.sgu.p(), N, Fs, st);
        cuda::matmul_forward(a.dh.p(), y.sa.p(), w.shared_down, N, Fs, D, st);
        cuda::add_bf16(a.dtmp.p(), a.dtmp.p(), a.dh.p(), size_t(N) * D, st);
      }
    }
    cuda::add_bf16(out, y.x2.p(), a.dtmp.p(), size_t(N) * D, st);
  }

  // Final norm, then the LM head and the loss a chunk of rows at a time: the N x V logits never
  // exist whole, and the chunk's logits buffer becomes its gradient in place.
  cuda::rmsnorm_forward(a.hf.p(), a.rstdf.p(), a.xs[size_t(L)].p(), w_.final_norm, N, D, eps, st);
  const int R = int(a.logits_chunk.n / size_t(V));
  if (b.targets) {
    for (int r0 = 0; r0 < N; r0 += R) {
      const int n = std::min(R, N - r0);
      cuda::matmul_forward(a.logits_chunk.p(), a.hf.p() + size_t(r0) * D, w_.head, n, D, V, st);
      cuda::cross_entropy_forward_backward(a.ce_loss.p() + r0, a.ce_lse.p() + r0,
                                           backward ? a.logits_chunk.p() : nullptr, a.logits_chunk.p(),
                                           a.targets.p() + r0, n, V, ce_scale, st);
      if (backward)
        cuda::matmul_backward(a.dh.p() + size_t(r0) * D, g_.head, a.logits_chunk.p(), a.hf.p() + size_t(r0) * D,
                              w_.head, n, D, V, st);
    }
  }

  if (backward) {
    float* scratch = a.scratch.p();
    cuda::rmsnorm_backward(a.dx.p(), g_.final_norm, a.dh.p(), a.xs[size_t(L)].p(), w_.final_norm, a.rstdf.p(), N, D,
                           scratch, st);
    for (int l = L - 1; l >= 0; --l) {
      auto& y = a.layers[size_t(l)];
      const LayerView<bf16>& w = w_.layers[size_t(l)];
      const LayerView<float>& g = g_.layers[size_t(l)];
      const bf16* x = a.xs[size_t(l)].p();
      // FFN branch: out = x2 + f(h2); dx holds d(out).
      if (!c_.is_moe_layer(l)) {
        const int Fd = int(c_.dense_width());
        cuda::matmul_backward(a.da.p(), g.w_down, a.dx.p(), y.a.p(), w.w_down, N, Fd, D, st);
        cuda::swiglu_backward(a.dgu.p(), a.da.p(), y.gu.p(), N, Fd, st);
        cuda::matmul_backward(a.dh.p(), g.w_gu, a.dgu.p(), y.h2.p(), w.w_gu, N, D, 2 * Fd, st);
      } else {
        cuda::moe_combine_backward(a.dyp.p(), a.dw.p(), a.dx.p(), y.yp.p(), y.w.p(), y.row.p(), N, K, D, st);
        cuda::grouped_matmul_backward(a.da.p(), g.w_down, a.dyp.p(), y.a.p(), w.w_down, y.offsets.p(),
                                      y.offsets_host.data(), E, F, D, st);
        cuda::swiglu_backward(a.dgu.p(), a.da.p(), y.gu.p(), M, F, st);
        cuda::grouped_matmul_backward(a.dxp.p(), g.w_gu, a.dgu.p(), y.xp.p(), w.w_gu, y.offsets.p(),
                                      y.offsets_host.data(), E, D, 2 * F, st);
        cuda::moe_permute_backward(a.dh.p(), a.dxp.p(), y.row.p(), N, K, D, st);
        MOP_CUDA_CHECK(cudaMemsetAsync(a.dprobs.p(), 0, size_t(N) * E * 4, st));
        if (lb_scale != 0.f) cuda::moe_lb_loss_backward(a.dprobs.p(), lb_scale, y.counts.p(), N, E, K, st);
        cuda::router_backward(a.dlogits.p(), a.dw.p(), a.dprobs.p(), y.probs.p(), y.idx.p(), rc, N, st);
        // The router GEMM's backward reads bf16: the fp32 logit gradients are rounded once here.
        cuda::cast_f32_to_bf16(a.dlogits_bf.p(), a.dlogits.p(), size_t(N) * E, st);
        cuda::matmul_backward(a.dtmp.p(), g.router, a.dlogits_bf.p(), y.h2.p(), w.router, N, D, E, st);
        cuda::add_bf16(a.dh.p(), a.dh.p(), a.dtmp.p(), size_t(N) * D, st);
        if (c_.shared_experts > 0) {
          const int Fs = int(c_.shared_width());
          cuda::matmul_backward(a.da.p(), g.shared_down, a.dx.p(), y.sa.p(), w.shared_down, N, Fs, D, st);
          cuda::swiglu_backward(a.dgu.p(), a.da.p(), y.sgu.p(), N, Fs, st);
          cuda::matmul_backward(a.dtmp.p(), g.shared_gu, a.dgu.p(), y.h2.p(), w.shared_gu, N, D, 2 * Fs, st);
          cuda::add_bf16(a.dh.p(), a.dh.p(), a.dtmp.p(), size_t(N) * D, st);
        }
      }
      cuda::rmsnorm_backward(a.dx2.p(), g.ln2, a.dh.p(), y.x2.p(), w.ln2, y.rstd2.p(), N, D, scratch, st);
      cuda::add_bf16(a.dx2.p(), a.dx2.p(), a.dx.p(), size_t(N) * D, st);

      // Attention branch: x2 = x + o_proj(att); dx2 holds d(x2).
      cuda::matmul_backward(a.datt.p(), g.wo, a.dx2.p(), y.att.p(), w.wo, N, Q, D, st);
      cuda::attention_backward(a.dq.p(), a.dk.p(), a.dv.p(), a.datt.p(), y.att.p(), y.lse.p(), y.q.p(), y.k.p(), y.v.p(),
                               a.cu.p(), b.cu_seqlens, b.n_docs, max_doc, N, H, KV, hd, scale, Q, KD, a.workspace.p(),
                               a.workspace_bytes, st);
      // datt is free again: it receives dq before the norm.
      cuda::qk_norm_rope_backward(a.datt.p(), g.q_norm, a.dq.p(), y.q_raw.p(), w.q_norm,
                                  c_.qk_norm ? y.rstd_q.p() : nullptr, a.positions.p(), N, H, hd, Q, c_.rope_theta,
                                  scratch, st);
      cuda::qk_norm_rope_backward(a.dkr.p(), g.k_norm, a.dk.p(), y.k_raw.p(), w.k_norm,
                                  c_.qk_norm ? y.rstd_k.p() : nullptr, a.positions.p(), N, KV, hd, KD, c_.rope_theta,
                                  scratch, st);
      copy_cols(a.dqkv.p(), O, a.datt.p(), Q, N, Q, st);
      copy_cols(a.dqkv.p() + Q, O, a.dkr.p(), KD, N, KD, st);
      copy_cols(a.dqkv.p() + Q + KD, O, a.dv.p(), KD, N, KD, st);
      cuda::matmul_backward(a.dh.p(), g.wqkv, a.dqkv.p(), y.h1.p(), w.wqkv, N, D, O, st);
      cuda::rmsnorm_backward(a.dx.p(), g.ln1, a.dh.p(), x, w.ln1, y.rstd1.p(), N, D, scratch, st);
      cuda::add_bf16(a.dx.p(), a.dx.p(), a.dx2.p(), size_t(N) * D, st);
    }
    cuda::embedding_backward(g_.embed, a.dx.p(), a.tokens.p(), N, D, V, a.workspace.p(), a.workspace_bytes, st);
  }

  // Statistics back to the host (one synchronisation at the end of the micro-batch).
  std::vector<float> loss(b.targets ? size_t(N) : 0);
  if (b.targets) MOP_CUDA_CHECK(cudaMemcpyAsync(loss.data(), a.ce_loss.p(), size_t(N) * 4, cudaMemcpyDeviceToHost, st));
  std::vector<float> lb(size_t(L), 0.f);
  std::vector<int32_t> counts(size_t(L) * E, 0);
  for (int l = 0; l < L; ++l) {
    if (!c_.is_moe_layer(l)) continue;
    auto& y = a.layers[size_t(l)];
    MOP_CUDA_CHECK(cudaMemcpyAsync(&lb[size_t(l)], y.lb.p(), 4, cudaMemcpyDeviceToHost, st));
    MOP_CUDA_CHECK(cudaMemcpyAsync(&counts[size_t(l) * E], y.counts.p(), size_t(E) * 4, cudaMemcpyDeviceToHost, st));
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(st));
  for (int i = 0; i < int(loss.size()); ++i) {
    stats.ce_sum += double(loss[size_t(i)]);
    stats.ce_tokens += b.targets[i] >= 0;
  }
  for (int l = 0; l < L; ++l) stats.lb_sum += double(lb[size_t(l)]);
  for (size_t i = 0; i < counts.size(); ++i) stats.counts[i] = counts[i];
  return stats;
}

double GpuDecoder::optimizer_step(double lr, double beta1, double beta2, double eps, double weight_decay, double clip,
                                  int64_t step) {
  Acts& a = *acts_;
  const size_t n = size_t(table_.total);
  // Buffers (the router bias) have zero gradients, so the norm over the flat array is the norm
  // over trainable parameters.
  Dev<double> norm2(1, Mem::workspace);
  cuda::sum_squares(norm2.p(), grads_.as<float>(), n, a.scratch.p(), stream_);
  double ss = 0;
  MOP_CUDA_CHECK(cudaMemcpyAsync(&ss, norm2.p(), 8, cudaMemcpyDeviceToHost, stream_));
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  const double norm = std::sqrt(ss);
  const double gscale = clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0;

  cuda::AdamWArgs args{};
  args.lr = float(lr), args.beta1 = float(beta1), args.beta2 = float(beta2), args.eps = float(eps);
  args.weight_decay = float(weight_decay);
  args.bias_correction1 = float(1.0 - std::pow(beta1, double(step)));
  args.bias_correction2 = float(1.0 - std::pow(beta2, double(step)));
  args.grad_scale = float(gscale);
  std::vector<cuda::AdamWTensor> tensors;
  for (const auto& p : table_.params) {
    if (!p.trainable) continue;
    cuda::AdamWTensor t{};
    t.p = master_.as<float>() + p.offset;
    t.g = grads_.as<float>() + p.offset;
    t.m = m_.as<float>() + p.offset;
    t.v = v_.as<float>() + p.offset;
    t.p_bf16 = weights_.as<bf16>() + p.offset;
    t.n = size_t(p.numel);
    t.weight_decay = p.decay ? float(weight_decay) : 0.f;
    tensors.push_back(t);
  }
  cuda::adamw_step_multi(tensors.data(), int(tensors.size()), args, stream_);
  return norm;
}

}  // namespace mop
